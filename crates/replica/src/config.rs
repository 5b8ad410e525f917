//! Config sources: files in known formats parsed into flat keys (`server.port = 8080`), so
//! diffs and proposals speak of keys, not only of bytes. Pure functions over bytes.

use serde_json::Value;

/// A config file format Kairos understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigFormat {
    Toml,
    Yaml,
    Json,
    Ini,
    Env,
    /// `key = value` or `key value` lines, as in postgresql.conf and redis.conf.
    KeyValue,
}

impl ConfigFormat {
    pub fn name(self) -> &'static str {
        match self {
            ConfigFormat::Toml => "toml",
            ConfigFormat::Yaml => "yaml",
            ConfigFormat::Json => "json",
            ConfigFormat::Ini => "ini",
            ConfigFormat::Env => "env",
            ConfigFormat::KeyValue => "key-value",
        }
    }

    pub fn from_name(name: &str) -> Option<ConfigFormat> {
        [
            ConfigFormat::Toml,
            ConfigFormat::Yaml,
            ConfigFormat::Json,
            ConfigFormat::Ini,
            ConfigFormat::Env,
            ConfigFormat::KeyValue,
        ]
        .into_iter()
        .find(|format| format.name() == name)
    }
}

/// The format a file name suggests, if any. `.conf`, `.cnf` and `.cfg` files are
/// key-value files unless their content has `[sections]` (see [`parse`]).
pub fn format_for_name(name: &[u8]) -> Option<ConfigFormat> {
    let name = std::str::from_utf8(name).ok()?.to_ascii_lowercase();
    if name == ".env" || name.ends_with(".env") || name.starts_with(".env.") {
        return Some(ConfigFormat::Env);
    }
    let extension = name.rsplit_once('.').map(|(_, extension)| extension)?;
    Some(match extension {
        "toml" => ConfigFormat::Toml,
        "yaml" | "yml" => ConfigFormat::Yaml,
        "json" => ConfigFormat::Json,
        "ini" => ConfigFormat::Ini,
        "conf" | "cnf" | "cfg" | "properties" => ConfigFormat::KeyValue,
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("is not UTF-8 text")]
    NotText,
    #[error("is not valid {format}: {reason}")]
    Syntax {
        format: &'static str,
        reason: String,
    },
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("has more than {0} keys")]
    TooManyKeys(usize),
    #[error("has keys and values of more than {0} bytes in all")]
    TooLarge(usize),
}

/// Bytes of keys and values a parse yields at most (a config node is one stored object, of
/// at most 1 MiB): past it the file's keys are not kept, and parsing stops there.
pub const PAIRS_BYTES_MAX: usize = 1 << 20;

/// Parses `bytes` as `format` into (key, value) pairs in file order. Repeated keys (as in
/// redis.conf's `save`) get `#2`, `#3`, ... suffixes.
pub fn parse(
    format: ConfigFormat,
    bytes: &[u8],
    keys_max: usize,
) -> Result<(ConfigFormat, Vec<(String, String)>), ConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ConfigError::NotText)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (format, pairs) = match format {
        ConfigFormat::Toml => (format, parse_toml(text)?),
        ConfigFormat::Yaml => (format, parse_yaml(text)?),
        ConfigFormat::Json => (format, parse_json(text)?),
        ConfigFormat::Ini => (format, parse_ini(text)?),
        ConfigFormat::Env => (format, parse_env(text)?),
        ConfigFormat::KeyValue if has_sections(text) => (ConfigFormat::Ini, parse_ini(text)?),
        ConfigFormat::KeyValue => (format, parse_key_value(text)?),
    };
    if pairs.len() > keys_max {
        return Err(ConfigError::TooManyKeys(keys_max));
    }
    if pairs_bytes(&pairs) > PAIRS_BYTES_MAX {
        return Err(ConfigError::TooLarge(PAIRS_BYTES_MAX));
    }
    Ok((format, number_repeats(pairs)))
}

fn pairs_bytes(pairs: &[(String, String)]) -> usize {
    pairs
        .iter()
        .map(|(key, value)| key.len() + value.len())
        .sum()
}

fn has_sections(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .any(|line| line.starts_with('[') && line.ends_with(']') && !line.contains('='))
}

fn number_repeats(mut pairs: Vec<(String, String)>) -> Vec<(String, String)> {
    // Counted on borrowed keys: only a repeated key costs a new string.
    let counts: Vec<usize> = {
        let mut seen: std::collections::HashMap<&str, usize> =
            std::collections::HashMap::with_capacity(pairs.len());
        pairs
            .iter()
            .map(|(key, _)| {
                let count = seen.entry(key.as_str()).or_insert(0);
                *count += 1;
                *count
            })
            .collect()
    };
    for ((key, _), count) in pairs.iter_mut().zip(counts) {
        if count > 1 {
            *key = format!("{key}#{count}");
        }
    }
    pairs
}

fn syntax(format: &'static str, reason: impl ToString) -> ConfigError {
    ConfigError::Syntax {
        format,
        reason: reason
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    let join = |key: &str| {
        if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                flatten(&join(key), child, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (index, child) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{index}]"), child, out);
            }
        }
        other => out.push((prefix.to_string(), scalar(other))),
    }
}

fn parse_json(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let value: Value = serde_json::from_str(text).map_err(|e| syntax("json", e))?;
    let mut out = Vec::new();
    flatten("", &value, &mut out);
    Ok(out)
}

fn parse_yaml(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value: Value =
            serde::Deserialize::deserialize(document).map_err(|e| syntax("yaml", e))?;
        flatten("", &value, &mut out);
    }
    Ok(out)
}

fn parse_toml(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let document: toml_edit::DocumentMut = text.parse().map_err(|e| syntax("toml", e))?;
    let mut out = Vec::new();
    toml_table("", document.as_table(), &mut out);
    Ok(out)
}

fn toml_table(prefix: &str, table: &dyn toml_edit::TableLike, out: &mut Vec<(String, String)>) {
    for (key, item) in table.iter() {
        let path = if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        };
        toml_item(&path, item, out);
    }
}

fn toml_item(path: &str, item: &toml_edit::Item, out: &mut Vec<(String, String)>) {
    match item {
        toml_edit::Item::None => {}
        toml_edit::Item::Value(value) => toml_value(path, value, out),
        toml_edit::Item::Table(table) => toml_table(path, table, out),
        toml_edit::Item::ArrayOfTables(array) => {
            for (index, table) in array.iter().enumerate() {
                toml_table(&format!("{path}[{index}]"), table, out);
            }
        }
    }
}

fn toml_value(path: &str, value: &toml_edit::Value, out: &mut Vec<(String, String)>) {
    use toml_edit::Value as V;
    match value {
        V::String(text) => out.push((path.to_string(), text.value().clone())),
        V::Integer(number) => out.push((path.to_string(), number.value().to_string())),
        V::Float(number) => out.push((path.to_string(), number.value().to_string())),
        V::Boolean(flag) => out.push((path.to_string(), flag.value().to_string())),
        V::Datetime(when) => out.push((path.to_string(), when.value().to_string())),
        V::Array(array) => {
            for (index, child) in array.iter().enumerate() {
                toml_value(&format!("{path}[{index}]"), child, out);
            }
        }
        V::InlineTable(table) => toml_table(path, table, out),
    }
}

/// Strips a trailing `#` or `;` comment that is not inside quotes.
fn strip_comment<'a>(line: &'a str, markers: &[u8]) -> &'a str {
    // Markers and quotes are ASCII, so a byte scan finds them without decoding characters
    // (a capture parses every config file it reads: this runs for each of their lines).
    let bytes = line.as_bytes();
    if !bytes.iter().any(|byte| markers.contains(byte)) {
        return line.trim();
    }
    let mut quote: Option<u8> = None;
    for (at, &byte) in bytes.iter().enumerate() {
        match quote {
            Some(open) if byte == open => quote = None,
            Some(_) => {}
            None if byte == b'"' || byte == b'\'' => quote = Some(byte),
            None if markers.contains(&byte) => return line[..at].trim(),
            None => {}
        }
    }
    line.trim()
}

fn unquote(value: &str) -> String {
    let value = value.trim();
    for quote in ['"', '\''] {
        if value.len() >= 2 && value.starts_with(quote) && value.ends_with(quote) {
            return value[1..value.len() - 1].to_string();
        }
    }
    value.to_string()
}

fn parse_ini(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    let mut section = String::new();
    // Every key repeats its section's name: a long name times many keys would hold far
    // more than the file, so the total is bounded as it grows.
    let mut total = 0usize;
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            // `[section] # note`: a comment may follow the header.
            let line = if line.ends_with(']') {
                line
            } else {
                strip_comment(line, b";#")
            };
            let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) else {
                return Err(ConfigError::Line {
                    line: index + 1,
                    reason: "section header without closing ']'".into(),
                });
            };
            section = name.trim().to_string();
            continue;
        }
        let line = strip_comment(line, b";#");
        let (key, value) = match line.find(['=', ':']) {
            Some(at) => (line[..at].trim(), unquote(&line[at + 1..])),
            // my.cnf style flags such as `skip-networking`
            None => (line, "true".to_string()),
        };
        if key.is_empty() {
            return Err(ConfigError::Line {
                line: index + 1,
                reason: "empty key".into(),
            });
        }
        let key = if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        };
        total += key.len() + value.len();
        if total > PAIRS_BYTES_MAX {
            return Err(ConfigError::TooLarge(PAIRS_BYTES_MAX));
        }
        out.push((key, value));
    }
    Ok(out)
}

fn parse_env(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(ConfigError::Line {
                line: index + 1,
                reason: "expected KEY=value".into(),
            });
        };
        let key = key.trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            return Err(ConfigError::Line {
                line: index + 1,
                reason: format!("{key:?} is not a variable name"),
            });
        }
        out.push((key.to_string(), unquote(strip_comment(value, b"#"))));
    }
    Ok(out)
}

fn parse_key_value(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = strip_comment(raw, b"#");
        if line.is_empty() {
            continue;
        }
        if line.contains(['{', '}']) {
            return Err(ConfigError::Line {
                line: index + 1,
                reason: "blocks in braces are not key-value lines".into(),
            });
        }
        let (key, value) = match line.find(|c: char| c == '=' || c.is_whitespace()) {
            Some(at) => {
                let rest = line[at..].trim_start();
                let rest = rest.strip_prefix('=').unwrap_or(rest);
                (line[..at].trim(), unquote(rest))
            }
            None => (line, String::new()),
        };
        if key.is_empty() || key.contains(['"', '\'']) {
            return Err(ConfigError::Line {
                line: index + 1,
                reason: "expected `key = value` or `key value`".into(),
            });
        }
        out.push((key.to_string(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    fn check(name: &str, text: &str, expected: Expect) {
        let format = format_for_name(name.as_bytes()).expect("a config name");
        let rendered = match parse(format, text.as_bytes(), 1000) {
            Ok((format, pairs)) => {
                let mut out = format!("[{}]\n", format.name());
                for (key, value) in pairs {
                    out.push_str(&format!("{key} = {value}\n"));
                }
                out
            }
            Err(error) => format!("error: {error}\n"),
        };
        expected.assert_eq(&rendered);
    }

    #[test]
    fn toml_nested_tables_and_arrays() {
        check(
            "app.toml",
            "title = \"web\" # name\n[server]\nport = 8080\nhosts = [\"a\", \"b\"]\n[[upstream]]\nurl = \"x\"\n",
            expect![[r#"
                [toml]
                title = web
                server.port = 8080
                server.hosts[0] = a
                server.hosts[1] = b
                upstream[0].url = x
            "#]],
        );
    }

    #[test]
    fn yaml_and_json() {
        check(
            "compose.yml",
            "services:\n  web:\n    ports: [80, 443]\n    env: {DEBUG: true}\n",
            expect![[r#"
                [yaml]
                services.web.ports[0] = 80
                services.web.ports[1] = 443
                services.web.env.DEBUG = true
            "#]],
        );
        check(
            "settings.json",
            r#"{"db": {"pool": 5, "name": "main"}, "debug": null}"#,
            expect![[r#"
                [json]
                db.pool = 5
                db.name = main
                debug = null
            "#]],
        );
    }

    #[test]
    fn postgres_and_redis_style_files() {
        check(
            "postgresql.conf",
            "# comment\nmax_connections = 100  # (change requires restart)\nlisten_addresses = 'localhost'\n",
            expect![[r#"
                [key-value]
                max_connections = 100
                listen_addresses = localhost
            "#]],
        );
        check(
            "redis.conf",
            "port 6379\nsave 900 1\nsave 300 10\nappendonly no\n",
            expect![[r#"
                [key-value]
                port = 6379
                save = 900 1
                save#2 = 300 10
                appendonly = no
            "#]],
        );
    }

    #[test]
    fn keys_that_would_outgrow_one_stored_object_are_refused_by_name() {
        // A long section name repeated in every key: 16 kB of file, 2 MB of keys.
        let mut text = format!("[{}]\n", "s".repeat(1000));
        for index in 0..2000 {
            text.push_str(&format!("k{index}=1\n"));
        }
        assert_eq!(
            parse(ConfigFormat::Ini, text.as_bytes(), 20_000),
            Err(ConfigError::TooLarge(PAIRS_BYTES_MAX))
        );
        let long_value = format!("key = {}\n", "v".repeat(PAIRS_BYTES_MAX + 1));
        assert_eq!(
            parse(ConfigFormat::KeyValue, long_value.as_bytes(), 20_000),
            Err(ConfigError::TooLarge(PAIRS_BYTES_MAX))
        );
    }

    #[test]
    fn comment_markers_inside_quotes_are_kept() {
        check(
            "app.conf",
            "  motd = \"# not a comment\" # a comment\ngreeting 'a;b' #\nunclosed = \"x # y\n# only a comment\nkey = é # é\n",
            expect![[r#"
                [key-value]
                motd = # not a comment
                greeting = a;b
                unclosed = "x # y
                key = é
            "#]],
        );
        check(
            "my.ini",
            "[s]\na = 'x;y' ; note\nb = 1 # note\n",
            expect![[r#"
                [ini]
                s.a = x;y
                s.b = 1
            "#]],
        );
        check(
            "my.ini",
            "[s]\na=1\n[t] # a note\nb=1\n[u] ; another\nc=1\n",
            expect![[r#"
                [ini]
                s.a = 1
                t.b = 1
                u.c = 1
            "#]],
        );
        check(
            "app.env",
            "A='#kept' # dropped\nB=plain\n",
            expect![[r#"
                [env]
                A = #kept
                B = plain
            "#]],
        );
    }

    #[test]
    fn ini_env_and_rejections() {
        check(
            "my.cnf",
            "[mysqld]\nport = 3306\nskip-networking\n",
            expect![[r#"
                [ini]
                mysqld.port = 3306
                mysqld.skip-networking = true
            "#]],
        );
        check(
            ".env",
            "export DATABASE_URL=\"postgres://x\"\nDEBUG=1 # on\n",
            expect![[r#"
                [env]
                DATABASE_URL = postgres://x
                DEBUG = 1
            "#]],
        );
        check(
            "nginx.conf",
            "worker_processes 1;\nevents {\n}\n",
            expect![[r#"
                error: line 2: blocks in braces are not key-value lines
            "#]],
        );
        check(
            "bad.json",
            "{\"a\": ",
            expect![[r#"
                error: is not valid json: EOF while parsing a value at line 1 column 6
            "#]],
        );
        assert_eq!(format_for_name(b"data.bin"), None);
    }
}
