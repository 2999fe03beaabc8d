//! `PORTCULLIS_<SECTION>_<KEY>` overrides, typed from the default configuration.

use std::collections::BTreeMap;

use super::{Config, ConfigError, ENV_PREFIX};

/// Applies `PORTCULLIS_<SECTION>_<KEY>` variables onto the file's table. The type of each
/// value is taken from the default configuration, so `"20"` becomes an integer where the key
/// is one; lists are comma-separated.
pub(super) fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let template = match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => unreachable!("the default configuration serializes to a table"),
    };
    // Longest section first, so PROXY_PROTOCOL_MODE is not read as a PROXY section.
    let mut sections: Vec<&String> = template.keys().collect();
    sections.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let vars: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    for (var, raw) in vars {
        let rest = &var[ENV_PREFIX.len()..];
        let env_err = |message: String| ConfigError::Env {
            var: var.clone(),
            message,
        };
        let (section, key) = sections
            .iter()
            .find_map(|s| {
                let key = rest.strip_prefix(&s.to_uppercase())?.strip_prefix('_')?;
                Some((s.as_str(), key.to_lowercase()))
            })
            .ok_or_else(|| env_err("names no configuration section".into()))?;
        let kind = template
            .get(section)
            .and_then(|s| s.get(&key))
            .ok_or_else(|| env_err(format!("no key {key:?} in [{section}]")))?;
        let value = typed_value(kind, &raw).map_err(env_err)?;
        let entry = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => {
                t.insert(key, value);
            }
            _ => return Err(env_err(format!("[{section}] in the file is not a table"))),
        }
    }
    Ok(())
}

fn typed_value(kind: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    match kind {
        toml::Value::Integer(_) => raw
            .trim()
            .parse()
            .map(toml::Value::Integer)
            .map_err(|_| format!("{raw:?} is not an integer")),
        toml::Value::Boolean(_) => raw
            .trim()
            .parse()
            .map(toml::Value::Boolean)
            .map_err(|_| format!("{raw:?} is not true or false")),
        toml::Value::Array(_) => Ok(toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.into()))
                .collect(),
        )),
        toml::Value::String(_) => Ok(toml::Value::String(raw.into())),
        _ => Err("this key cannot be set from the environment".into()),
    }
}
