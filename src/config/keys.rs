//! Key settings: the key prefix, the scope catalogue and presets, and the
//! gateway's route table file.

use std::time::Duration;

use super::{ConfigError, Settings};
use crate::keys::{KeyPrefix, operator::OPERATOR_PREFIX, scope::ScopeCatalogue};

impl Settings {
    pub fn key_prefix(&self) -> Result<KeyPrefix, ConfigError> {
        if self.key_prefix == OPERATOR_PREFIX {
            return Err(ConfigError::Invalid(format!(
                "key_prefix {OPERATOR_PREFIX:?} is reserved for operator tokens"
            )));
        }
        KeyPrefix::new(&self.key_prefix).map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    pub fn catalogue(&self) -> Result<ScopeCatalogue, ConfigError> {
        let (default_scopes, default_presets) = ScopeCatalogue::default_defs();
        let scopes = self.scopes.clone().unwrap_or(default_scopes);
        // Custom scopes without custom presets: the default presets would
        // name scopes that may not exist, so there are none.
        let presets = match (&self.scopes, &self.presets) {
            (_, Some(presets)) => presets.clone(),
            (None, None) => default_presets,
            (Some(_), None) => Vec::new(),
        };
        Ok(ScopeCatalogue::new(scopes, presets)?)
    }

    pub fn routes_reload_interval(&self) -> Duration {
        Duration::from_millis(self.routes_reload_interval_ms.max(10))
    }
}
