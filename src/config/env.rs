//! `PORTCULLIS_<SECTION>_<KEY>` overrides, typed from the default configuration.
//!
//! Strict where it helps, tolerant where orchestrators need it (SPEC 9): a variable that
//! names a key but holds an invalid value is an error naming the variable, while one that
//! names no key is only collected, to be reported in one warning at start. Kubernetes
//! injects `PORTCULLIS_PORT=tcp://…`, `PORTCULLIS_SERVICE_HOST`, … into every pod of a
//! namespace with a Service named `portcullis`; refusing those would crash-loop the pod.

use std::collections::BTreeMap;

use super::{Config, ConfigError, ENV_PREFIX};

/// What set a key, when it was not the file.
#[derive(Debug)]
enum Origin {
    Env(String),
    Flag(&'static str),
}

/// What the environment (and the flags after it) did to the configuration.
#[derive(Debug, Default)]
pub(super) struct EnvOverrides {
    /// What set each key, by dotted key (`limits.idle_timeout`), so that a later type or
    /// validation error about that key names the variable or flag the operator wrote.
    set: BTreeMap<String, Origin>,
    /// Variables with the prefix that name no key, sorted.
    pub(super) unknown: Vec<String>,
}

impl EnvOverrides {
    /// Rewrites an error about a key that a variable or flag set into one naming it.
    pub(super) fn blame(&self, error: ConfigError) -> ConfigError {
        let ConfigError::Key { key, message } = error else {
            return error;
        };
        // `auth.tokens[0].name` was set by whoever set `auth.tokens`.
        let base = key.split('[').next().unwrap_or(&key);
        match self.set.get(base) {
            Some(Origin::Env(var)) => ConfigError::Env {
                var: var.clone(),
                message: format!("{key}: {message}"),
            },
            Some(Origin::Flag(flag)) => ConfigError::Flag { flag, message },
            None => ConfigError::Key { key, message },
        }
    }

    /// Records that a command-line flag set `key`: its errors are the flag's.
    pub(super) fn set_by_flag(&mut self, key: &str, flag: &'static str) {
        self.set.insert(key.to_string(), Origin::Flag(flag));
    }
}

/// Applies `PORTCULLIS_<SECTION>_<KEY>` variables onto the file's table. The type of each
/// value is taken from the default configuration, so `"20"` becomes an integer where the key
/// is one; lists are comma-separated. Only keys present in the serialized default can be
/// set this way (an `Option` key that is `None` by default must serialize to a value).
pub(super) fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<EnvOverrides, ConfigError> {
    let template = match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => unreachable!("the default configuration serializes to a table"),
    };
    let vars: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    let mut overrides = EnvOverrides::default();
    for (var, raw) in vars {
        let Some((section, key, kind)) = find_key(&template, &var[ENV_PREFIX.len()..]) else {
            overrides.unknown.push(var);
            continue;
        };
        let env_err = |message: String| ConfigError::Env {
            var: var.clone(),
            message,
        };
        let value = typed_value(kind, &raw).map_err(env_err)?;
        let entry = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => {
                t.insert(key.clone(), value);
            }
            _ => return Err(env_err(format!("[{section}] in the file is not a table"))),
        }
        overrides
            .set
            .insert(format!("{section}.{key}"), Origin::Env(var));
    }
    Ok(overrides)
}

/// The section, key and default value that `rest` (the variable without its prefix) names.
/// Longest section first, so `PROXY_PROTOCOL_MODE` is not read as a `PROXY` section.
fn find_key<'t>(
    template: &'t toml::Table,
    rest: &str,
) -> Option<(&'t str, String, &'t toml::Value)> {
    let mut sections: Vec<&String> = template.keys().collect();
    sections.sort_by_key(|s| std::cmp::Reverse(s.len()));
    sections.into_iter().find_map(|section| {
        let key = rest
            .strip_prefix(&section.to_uppercase())?
            .strip_prefix('_')?
            .to_lowercase();
        let kind = template.get(section)?.get(&key)?;
        Some((section.as_str(), key, kind))
    })
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
