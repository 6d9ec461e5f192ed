//! Load errors as operators read them: the setting by its TOML key and
//! environment variable, what was expected and what was found, never the
//! value (it may be a secret).

use figment::Figment;

/// figment's own messages quote the offending value, and for a token, a
/// pepper or a database URL that value is the secret. This names each
/// setting (as the source spells it, e.g. `KEYWARDEN_ADMIN_TOKENS`) and
/// what is wrong with it, never the value.
pub fn describe_load_error(e: figment::Error, figment: &Figment) -> String {
    let described: Vec<String> = e.into_iter().map(|e| describe_one(&e, figment)).collect();
    described.join("; ")
}

fn describe_one(e: &figment::Error, figment: &Figment) -> String {
    use figment::error::Kind;
    let key = e.path.join(".");
    let setting = match &e.metadata {
        _ if key.is_empty() => "the settings".to_owned(),
        Some(md) if md.name.contains("environment") => {
            format!("KEYWARDEN_{}", md.interpolate(&e.profile.clone().unwrap_or_default(), &e.path))
        }
        Some(md) => match &md.source {
            Some(source) => format!("{key} (in {source})"),
            None => format!("{key} (in {})", md.name),
        },
        None => key.clone(),
    };
    let what = match &e.kind {
        Kind::InvalidType(actual, expected) => format!("expected {expected}, found {}", type_of(actual)),
        Kind::InvalidValue(actual, expected) => format!("invalid {}, expected {expected}", type_of(actual)),
        Kind::InvalidLength(_, expected) => format!("invalid length, expected {expected}"),
        Kind::UnknownVariant(_, expected) => {
            format!("unknown value, expected one of: {}", expected.join(", "))
        }
        Kind::UnknownField(field, _) => format!("unknown setting {field}"),
        Kind::MissingField(field) => format!("missing setting {field}"),
        Kind::DuplicateField(field) => format!("{field} is set twice"),
        Kind::ISizeOutOfRange(_) | Kind::USizeOutOfRange(_) => "out of range".to_owned(),
        Kind::Unsupported(actual) => format!("{} is not supported here", type_of(actual)),
        Kind::UnsupportedKey(_, expected) => format!("unsupported key, expected {expected}"),
        // A parser's own message (an address, a path) is kept only when it
        // is known not to quote the value.
        Kind::Message(message) => match figment.find_value(&key) {
            Ok(figment::value::Value::String(_, value)) if !value.is_empty() && !message.contains(&value) => {
                message.clone()
            }
            _ => "invalid value".to_owned(),
        },
    };
    format!("{setting}: {what}")
}

fn type_of(actual: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a number",
        Actual::Char(_) => "a character",
        Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Seq => "a list",
        Actual::Map => "a table",
        Actual::Unit | Actual::Option => "an empty value",
        _ => "a value",
    }
}

#[cfg(test)]
mod tests {
    use figment::providers::{Format, Toml};

    use super::*;
    use crate::config::Settings;

    #[test]
    fn load_errors_name_the_setting_and_never_quote_its_value() {
        let cases = [
            (r#"admin_tokens = "s3cr3t-token""#, "admin_tokens", "expected a map, found a string"),
            (r#"pepper = ["s3cr3t-pepper"]"#, "pepper", "found a list"),
            (r#"peppers = "s3cr3t-pepper""#, "peppers", "expected a map, found a string"),
            (r#"admin_token = 4711"#, "admin_token", "found an integer"),
            (r#"db_max_connections = "s3cr3t-count""#, "db_max_connections", "found a string"),
            // A parser's message that does not quote the value is kept.
            (r#"listen_addr = "s3cr3t-address""#, "listen_addr", "invalid socket address syntax"),
        ];
        for (toml, setting, what) in cases {
            let figment = Figment::new().merge(Toml::string(toml));
            let e = figment.extract::<Settings>().unwrap_err();
            let described = describe_load_error(e, &figment);
            assert!(!described.contains("s3cr3t") && !described.contains("4711"), "{described}");
            assert!(described.contains(setting) && described.contains(what), "{toml}: {described}");
        }
    }
}
