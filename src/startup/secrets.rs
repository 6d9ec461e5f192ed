//! The secrets a replica runs with: the configured peppers and admin
//! tokens, or, on an embedded run with none configured, ones generated once
//! into the data directory (so that the first-run command is secure by
//! default); and the data directory kept private to this user. This is
//! the only place keywarden writes a secret to disk.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use secrecy::{ExposeSecret, SecretString};

use crate::{
    config::{ConfigError, DATABASE_FILE, Settings},
    keys::{KeyHasher, PepperId},
};

/// Shortest admin token accepted: anything shorter is guessable.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// Secrets after bootstrap: where each came from is reported, never the value.
#[derive(Debug)]
pub struct Secrets {
    pub hasher: KeyHasher,
    pub admin_tokens: Vec<(String, SecretString)>,
}

impl Secrets {
    /// Takes the configured secrets or, on an embedded run, reads or
    /// generates them in the data directory.
    pub fn resolve(settings: &Settings) -> Result<Self, ConfigError> {
        let hasher = resolve_peppers(settings)?;

        let mut admin_tokens: Vec<(String, SecretString)> =
            settings.admin_tokens.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
        if let Some(token) = &settings.admin_token {
            if settings.admin_tokens.contains_key("admin") {
                return Err(ConfigError::Invalid(
                    "admin_token and admin_tokens.admin are both set; keep one".into(),
                ));
            }
            admin_tokens.push(("admin".into(), token.clone()));
        }
        if admin_tokens.is_empty() {
            if !settings.is_embedded() {
                return Err(ConfigError::Invalid(
                    "an admin token is required with PostgreSQL: set KEYWARDEN_ADMIN_TOKEN or admin_tokens"
                        .into(),
                ));
            }
            let token = bootstrap(&settings.data_dir, ADMIN_TOKEN_FILE, "KEYWARDEN_ADMIN_TOKEN", 32)?;
            admin_tokens.push(("admin".into(), token));
        }
        for (name, token) in &admin_tokens {
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok {
                return Err(ConfigError::Invalid(format!(
                    "admin token name {name:?} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'"
                )));
            }
            if token.expose_secret().len() < MIN_ADMIN_TOKEN_LEN {
                return Err(ConfigError::Invalid(format!(
                    "admin token {name:?} (KEYWARDEN_ADMIN_TOKEN or KEYWARDEN_ADMIN_TOKENS) is shorter than \
                     {MIN_ADMIN_TOKEN_LEN} characters"
                )));
            }
        }
        Ok(Self { hasher, admin_tokens })
    }
}

/// The configured pepper generations as one [`KeyHasher`]. Generation `1`
/// is `pepper` (on an embedded run, read or generated in the data
/// directory when not configured); errors name generations, never values.
fn resolve_peppers(settings: &Settings) -> Result<KeyHasher, ConfigError> {
    let mut peppers: Vec<(PepperId, SecretString)> = Vec::new();
    for (id, secret) in &settings.peppers {
        let id = PepperId::parse(id).map_err(|e| {
            ConfigError::Invalid(format!("peppers (KEYWARDEN_PEPPERS) names a generation {id:?}: {e}"))
        })?;
        if id.is_first() && settings.pepper.is_some() {
            return Err(ConfigError::Invalid(
                "pepper (KEYWARDEN_PEPPER) and peppers.1 are both generation 1; keep one".into(),
            ));
        }
        peppers.push((id, secret.clone()));
    }
    let first = match &settings.pepper {
        Some(p) => Some(p.clone()),
        // Nothing configured: an embedded run makes its own.
        None if settings.is_embedded() && settings.peppers.is_empty() => {
            Some(bootstrap(&settings.data_dir, PEPPER_FILE, "KEYWARDEN_PEPPER", 32)?)
        }
        // Rotated on an embedded run: the generated pepper stays generation
        // 1 while its file is there, but a missing one is never made up.
        None if settings.is_embedded() && !settings.peppers.contains_key(PepperId::FIRST) => {
            read_secret(&settings.data_dir.join(PEPPER_FILE))?
        }
        None => None,
    };
    if let Some(first) = first {
        peppers.insert(0, (PepperId::first(), first));
    }
    let current = match (&settings.pepper_current, peppers.as_slice()) {
        (Some(id), _) => PepperId::parse(id)
            .map_err(|e| ConfigError::Invalid(format!("pepper_current (KEYWARDEN_PEPPER_CURRENT): {e}")))?,
        (None, [(only, _)]) => only.clone(),
        (None, []) => {
            return Err(ConfigError::Invalid(
                "KEYWARDEN_PEPPER is required with PostgreSQL (base64, at least 32 bytes); \
                 generate one with: head -c 32 /dev/urandom | base64"
                    .into(),
            ));
        }
        (None, _) => {
            return Err(ConfigError::Invalid(
                "several peppers are configured: name the one new hashes use in pepper_current \
                 (KEYWARDEN_PEPPER_CURRENT)"
                    .into(),
            ));
        }
    };
    Ok(KeyHasher::new(peppers.iter().map(|(id, secret)| (id.clone(), secret.expose_secret())), &current)?)
}

/// Where an embedded run keeps the pepper and the admin token it generated.
const PEPPER_FILE: &str = "pepper";
const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Files of the data directory that hold key hashes, the audit trail or
/// secrets.
const PRIVATE_FILES: [&str; 5] =
    [DATABASE_FILE, "keywarden.db-wal", "keywarden.db-shm", PEPPER_FILE, ADMIN_TOKEN_FILE];

/// Makes the data directory private to this user, on every start: `dir` is
/// created 0700 (with any missing parents) or, if it exists with wider
/// modes, tightened to 0700; the files in it that hold private data are
/// tightened to 0600; and the database file is created 0600 before SQLite
/// opens it, so that its WAL and shared-memory files, which SQLite creates
/// with the database's mode, are too. Returns what it had to tighten, for
/// the caller to name in a warning.
pub fn secure_data_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    create_private_dir(dir)?;
    let mut tightened = Vec::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let tighten = |path: &Path, mode: u32, tightened: &mut Vec<PathBuf>| -> std::io::Result<()> {
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                    tightened.push(path.to_owned());
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        };
        tighten(dir, 0o700, &mut tightened)?;
        for file in PRIVATE_FILES {
            tighten(&dir.join(file), 0o600, &mut tightened)?;
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(DATABASE_FILE))
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(tightened)
}

/// Creates `dir` (and parents) readable by this user only.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Reads `<dir>/<file>`, or creates it (mode 0600) with `len` random bytes in
/// base64 and says so on stderr — the path, never the value.
/// A secret file's content, or `None` if there is no such file.
fn read_secret(path: &Path) -> Result<Option<SecretString>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(existing) => Ok(Some(SecretString::from(existing.trim().to_owned()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigError::Io { what: "cannot read", path: path.to_owned(), source: e }),
    }
}

fn bootstrap(dir: &Path, file: &str, variable: &str, len: usize) -> Result<SecretString, ConfigError> {
    let path = dir.join(file);
    if let Some(existing) = read_secret(&path)? {
        return Ok(existing);
    }
    create_private_dir(dir).map_err(|e| ConfigError::Io {
        what: "cannot create",
        path: dir.into(),
        source: e,
    })?;
    let mut bytes = vec![0u8; len];
    crate::keys::format::fill_random(&mut bytes).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let value = STANDARD.encode(&bytes);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&path).map_err(|e| ConfigError::Io {
        what: "cannot create",
        path: path.clone(),
        source: e,
    })?;
    f.write_all(value.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| ConfigError::Io {
        what: "cannot write",
        path: path.clone(),
        source: e,
    })?;
    eprintln!(
        "\n*** keywarden: no {variable} configured: generated one into {} (mode 0600).\n\
         *** Keep it: {}\n",
        path.display(),
        if file == PEPPER_FILE {
            "keys hashed with this pepper only verify with it."
        } else {
            "send it as `authorization: Bearer <token>` on KeyAdmin calls."
        }
    );
    Ok(SecretString::from(value))
}

#[cfg(test)]
mod tests {
    use figment::{
        Figment,
        providers::{Format, Toml},
    };

    use super::*;

    #[test]
    fn embedded_first_run_generates_secrets_once_with_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings { data_dir: dir.path().to_owned(), ..Settings::default() };
        let first = Secrets::resolve(&settings).unwrap();
        let second = Secrets::resolve(&settings).unwrap();
        assert_eq!(first.admin_tokens[0].1.expose_secret(), second.admin_tokens[0].1.expose_secret());
        #[cfg(unix)]
        for file in [PEPPER_FILE, ADMIN_TOKEN_FILE] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }

    #[test]
    fn postgres_requires_configured_secrets() {
        let settings =
            Settings { database_url: Some("postgres://x@localhost/db".into()), ..Settings::default() };
        let err = Secrets::resolve(&settings).unwrap_err().to_string();
        assert!(err.contains("KEYWARDEN_PEPPER"), "{err}");
    }

    #[test]
    fn peppers_rotate_by_id_with_one_named_current() {
        let b64 = |byte: u8| STANDARD.encode([byte; 32]);
        let load = |toml: &str| {
            let mut settings: Settings = Figment::new().merge(Toml::string(toml)).extract().unwrap();
            settings.database_url = Some("postgres://x@localhost/db".into());
            settings.admin_token = Some(SecretString::from("a-long-enough-admin-token"));
            Secrets::resolve(&settings).map(|s| s.hasher)
        };
        let error = |toml: &str| {
            let e = load(toml).unwrap_err();
            let mut text = e.to_string();
            if let Some(source) = std::error::Error::source(&e) {
                text = format!("{text}: {source}");
            }
            text
        };
        let (one, two) = (b64(1), b64(2));

        // An environment variable's `2` arrives as a number; it is an id.
        let hasher =
            load(&format!("pepper = \"{one}\"\npeppers = {{ 2 = \"{two}\" }}\npepper_current = 2")).unwrap();
        assert_eq!(hasher.current().as_str(), "2");
        assert_eq!(hasher.ids().map(|id| id.as_str().to_owned()).collect::<Vec<_>>(), ["2", "1"]);
        // Generation 1 may be retired.
        let hasher = load(&format!("peppers = {{ 2 = \"{two}\" }}")).unwrap();
        assert_eq!(hasher.ids().count(), 1);

        let several = error(&format!("pepper = \"{one}\"\npeppers = {{ 2 = \"{two}\" }}"));
        assert!(several.contains("KEYWARDEN_PEPPER_CURRENT"), "{several}");
        let twice = error(&format!("pepper = \"{one}\"\npeppers = {{ 1 = \"{two}\" }}"));
        assert!(twice.contains("both generation 1"), "{twice}");
        let unknown = error(&format!("pepper = \"{one}\"\npepper_current = \"3\""));
        assert!(unknown.contains("current pepper 3 is not configured"), "{unknown}");
        let bad_id = error(&format!("peppers = {{ \"a.b\" = \"{two}\" }}"));
        assert!(bad_id.contains("KEYWARDEN_PEPPERS"), "{bad_id}");
        // A malformed secret is named by its generation, never quoted.
        let garbled =
            error(&format!("pepper = \"{one}\"\npeppers = {{ 2 = \"s3cr3t!!\" }}\npepper_current = 2"));
        assert!(garbled.contains("pepper 2 is not valid base64") && !garbled.contains("s3cr3t"), "{garbled}");
        let short = error(&format!("peppers = {{ 2 = \"{}\" }}", STANDARD.encode(b"s3cr3t")));
        assert!(short.contains("pepper 2 must be at least 32 bytes"), "{short}");
    }

    #[test]
    fn short_admin_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            data_dir: dir.path().to_owned(),
            admin_token: Some(SecretString::from("short")),
            ..Settings::default()
        };
        assert!(Secrets::resolve(&settings).is_err());
    }
}
