//! Editing one key of a config file while keeping everything else as it was: comments,
//! order, spacing and quoting. TOML through `toml_edit`; INI, .env and key-value files
//! (postgresql.conf, redis.conf) line by line; YAML block mappings line by line; JSON by
//! re-serialising (JSON has no comments; key order is kept).

use kairos_capture::config::ConfigFormat;
use serde_json::Value;

/// Sets `key` to `value` (`None`: removes the key) in `text`, a file of `format`.
/// Keys are the dotted paths `kairos show` lists; `#2` picks a repeated key's 2nd line.
pub fn edit_key(
    format: ConfigFormat,
    text: &str,
    key: &str,
    value: Option<&Value>,
) -> Result<String, String> {
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    match format {
        ConfigFormat::Toml => edit_toml(text, key, value),
        ConfigFormat::Json => edit_json(text, key, value),
        ConfigFormat::Yaml => edit_yaml(text, key, value),
        ConfigFormat::Ini | ConfigFormat::Env | ConfigFormat::KeyValue => {
            edit_lines(format, text, key, value)
        }
    }
}

fn scalar_text(value: &Value) -> Result<String, String> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Number(number) => Ok(number.to_string()),
        Value::Bool(flag) => Ok(flag.to_string()),
        Value::Null => Err("the value is null (use unset_config to remove a key)".into()),
        _ => Err("the value must be a string, number or boolean".into()),
    }
}

fn edit_toml(text: &str, key: &str, value: Option<&Value>) -> Result<String, String> {
    let mut document: toml_edit::DocumentMut = text
        .parse()
        .map_err(|error| format!("is not valid TOML: {error}"))?;
    let parts: Vec<&str> = key.split('.').collect();
    let (last, parents) = parts.split_last().ok_or("the key is empty")?;
    let mut table: &mut dyn toml_edit::TableLike = document.as_table_mut();
    for (depth, part) in parents.iter().enumerate() {
        if table.get(part).is_none() {
            if value.is_none() {
                return Err(format!("key {key:?} does not exist"));
            }
            table.insert(part, toml_edit::Item::Table(toml_edit::Table::new()));
        }
        table = match table.get_mut(part) {
            Some(toml_edit::Item::Table(inner)) => inner,
            Some(toml_edit::Item::Value(toml_edit::Value::InlineTable(inner))) => inner,
            _ => {
                return Err(format!("{:?} is not a table", parts[..=depth].join(".")));
            }
        };
    }
    match value {
        None => {
            if table.remove(last).is_none() {
                return Err(format!("key {key:?} does not exist"));
            }
        }
        Some(value) => {
            let mut new: toml_edit::Value = match value {
                Value::String(text) => text.as_str().into(),
                Value::Bool(flag) => (*flag).into(),
                Value::Number(number) => match number.as_i64() {
                    Some(integer) => integer.into(),
                    None => number.as_f64().unwrap_or_default().into(),
                },
                _ => return Err("the value must be a string, number or boolean".into()),
            };
            match table.get_mut(last) {
                Some(toml_edit::Item::Value(old)) => {
                    *new.decor_mut() = old.decor().clone();
                    *old = new;
                }
                Some(_) => return Err(format!("key {key:?} is a table, not a value")),
                None => {
                    table.insert(last, toml_edit::Item::Value(new));
                }
            }
        }
    }
    Ok(document.to_string())
}

fn edit_json(text: &str, key: &str, value: Option<&Value>) -> Result<String, String> {
    let mut document: Value =
        serde_json::from_str(text).map_err(|error| format!("is not valid JSON: {error}"))?;
    let parts: Vec<&str> = key.split('.').collect();
    let (last, parents) = parts.split_last().ok_or("the key is empty")?;
    let mut node = &mut document;
    for part in parents {
        let object = node
            .as_object_mut()
            .ok_or_else(|| format!("{part:?} is not inside an object"))?;
        if !object.contains_key(*part) {
            if value.is_none() {
                return Err(format!("key {key:?} does not exist"));
            }
            object.insert(part.to_string(), Value::Object(Default::default()));
        }
        node = object.get_mut(*part).ok_or("unreachable")?;
    }
    let object = node
        .as_object_mut()
        .ok_or_else(|| format!("the parent of {key:?} is not an object"))?;
    match value {
        None => {
            if object.shift_remove(*last).is_none() {
                return Err(format!("key {key:?} does not exist"));
            }
        }
        Some(value) => {
            object.insert(last.to_string(), value.clone());
        }
    }
    let mut out = serde_json::to_string_pretty(&document).map_err(|e| e.to_string())?;
    if text.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

/// Where a key's value sits in a line: the byte range to replace.
struct Located {
    line: usize,
    value_start: usize,
    value_end: usize,
}

fn split_lines(text: &str) -> Vec<&str> {
    text.split_inclusive('\n').collect()
}

fn line_body(line: &str) -> &str {
    line.trim_end_matches(['\n', '\r'])
}

/// Byte offset where a trailing comment starts (outside quotes), or the line's end.
fn comment_start(line: &str, markers: &[char]) -> usize {
    let mut quote: Option<char> = None;
    for (at, character) in line.char_indices() {
        match quote {
            Some(open) if character == open => quote = None,
            Some(_) => {}
            None if character == '"' || character == '\'' => quote = Some(character),
            None if markers.contains(&character) => return at,
            None => {}
        }
    }
    line.len()
}

/// (key, value range) of each key line, with INI section prefixes, in file order.
fn locate_all(format: ConfigFormat, text: &str) -> Vec<(String, Located)> {
    let mut out = Vec::new();
    let mut section = String::new();
    let markers: &[char] = match format {
        ConfigFormat::Ini => &[';', '#'],
        _ => &['#'],
    };
    for (index, raw) in split_lines(text).into_iter().enumerate() {
        let body = line_body(raw);
        let trimmed = body.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if format == ConfigFormat::Ini && trimmed.starts_with('[') {
            section = trimmed
                .trim_start_matches('[')
                .trim_end_matches(']')
                .trim()
                .to_string();
            continue;
        }
        let indent = body.len() - body.trim_start().len();
        let mut key_start = indent;
        if format == ConfigFormat::Env && body[indent..].starts_with("export ") {
            key_start += "export ".len();
        }
        let end = comment_start(body, markers).max(key_start);
        let content = &body[key_start..end];
        let separator = match format {
            ConfigFormat::Ini => content.find(['=', ':']),
            ConfigFormat::Env => content.find('='),
            _ => content.find(|c: char| c == '=' || c.is_whitespace()),
        };
        let Some(separator) = separator else {
            continue;
        };
        let key = content[..separator].trim();
        let mut value_start = key_start + separator;
        let rest = &body[value_start..end];
        let skipped = rest.len() - rest.trim_start().len();
        value_start += skipped;
        if body[value_start..end].starts_with(['=', ':']) {
            value_start += 1;
            let rest = &body[value_start..end];
            value_start += rest.len() - rest.trim_start().len();
        }
        let value_end = value_start + body[value_start..end].trim_end().len();
        let key = if format == ConfigFormat::Ini && !section.is_empty() {
            format!("{section}.{key}")
        } else {
            key.to_string()
        };
        out.push((
            key,
            Located {
                line: index,
                value_start,
                value_end,
            },
        ));
    }
    out
}

fn quote_like(old: &str, new: &str, format: ConfigFormat) -> String {
    for quote in ['"', '\''] {
        if old.len() >= 2 && old.starts_with(quote) && old.ends_with(quote) {
            return format!("{quote}{new}{quote}");
        }
    }
    let needs_quotes = new.is_empty()
        || new.contains(['#', ';'])
        || (format != ConfigFormat::KeyValue && new.contains(char::is_whitespace));
    if needs_quotes && format != ConfigFormat::KeyValue {
        format!("\"{new}\"")
    } else {
        new.to_string()
    }
}

fn edit_lines(
    format: ConfigFormat,
    text: &str,
    key: &str,
    value: Option<&Value>,
) -> Result<String, String> {
    let (wanted, occurrence) = match key.rsplit_once('#') {
        Some((base, n)) if n.parse::<usize>().is_ok_and(|n| n >= 2) => {
            (base, n.parse::<usize>().unwrap_or(1))
        }
        _ => (key, 1),
    };
    let located = locate_all(format, text);
    let found = located
        .iter()
        .filter(|(name, _)| name == wanted)
        .nth(occurrence - 1)
        .map(|(_, at)| at);
    let mut lines: Vec<String> = split_lines(text).into_iter().map(str::to_string).collect();
    match (found, value) {
        (Some(at), Some(value)) => {
            let line = &lines[at.line];
            let old = &line[at.value_start..at.value_end];
            let new = quote_like(old, &scalar_text(value)?, format);
            lines[at.line] = format!(
                "{}{}{}",
                &line[..at.value_start],
                new,
                &line[at.value_end..]
            );
        }
        (Some(at), None) => {
            lines.remove(at.line);
        }
        (None, None) => return Err(format!("key {key:?} does not exist")),
        (None, Some(value)) => {
            if occurrence > 1 {
                return Err(format!(
                    "key {key:?} does not exist (a new key cannot be a repeat)"
                ));
            }
            let new = quote_like("", &scalar_text(value)?, format);
            let (section, name) = match format {
                ConfigFormat::Ini => match wanted.split_once('.') {
                    Some((section, name)) => (Some(section), name),
                    None => (None, wanted),
                },
                _ => (None, wanted),
            };
            let uses_equals = match format {
                ConfigFormat::KeyValue => located
                    .first()
                    .map(|(_, at)| lines[at.line][..at.value_start].contains('='))
                    .unwrap_or(true),
                _ => true,
            };
            let new_line = if uses_equals {
                if format == ConfigFormat::Env {
                    format!("{name}={new}\n")
                } else {
                    format!("{name} = {new}\n")
                }
            } else {
                format!("{name} {new}\n")
            };
            if let Some(last) = lines.last_mut().filter(|last| !last.ends_with('\n')) {
                last.push('\n');
            }
            match section {
                Some(section) => {
                    let in_section = located
                        .iter()
                        .filter(|(key, _)| key.starts_with(&format!("{section}.")))
                        .map(|(_, at)| at.line)
                        .max();
                    let header = lines
                        .iter()
                        .position(|line| line.trim() == format!("[{section}]"));
                    match in_section.or(header) {
                        Some(after) => lines.insert(after + 1, new_line),
                        None => {
                            lines.push(format!("\n[{section}]\n"));
                            lines.push(new_line);
                        }
                    }
                }
                None => lines.push(new_line),
            }
        }
    }
    Ok(lines.concat())
}

/// YAML block mappings, line by line: replaces or removes a scalar key, or adds one
/// where its parent mapping is (top-level keys at the end).
fn edit_yaml(text: &str, key: &str, value: Option<&Value>) -> Result<String, String> {
    let mut lines: Vec<String> = split_lines(text).into_iter().map(str::to_string).collect();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut found: Option<(usize, usize, usize)> = None;
    let mut parent_end: Option<(usize, usize)> = None;
    let wanted_parent = key.rsplit_once('.').map(|(parent, _)| parent);
    for (index, raw) in lines.iter().enumerate() {
        let body = line_body(raw);
        let trimmed = body.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('-') {
            continue;
        }
        let indent = body.len() - trimmed.len();
        let Some(colon) = trimmed.find(':') else {
            continue;
        };
        while stack.last().is_some_and(|(depth, _)| *depth >= indent) {
            stack.pop();
        }
        let name = trimmed[..colon]
            .trim()
            .trim_matches(['"', '\''])
            .to_string();
        let mut path: Vec<&str> = stack.iter().map(|(_, n)| n.as_str()).collect();
        path.push(&name);
        let full = path.join(".");
        if let Some(parent) = wanted_parent {
            let parent_depth = parent.split('.').count();
            if full == parent {
                parent_end = Some((index, indent + 2));
            } else if full.starts_with(&format!("{parent}.")) {
                let child_indent = match parent_end {
                    Some((_, child_indent)) if path.len() > parent_depth + 1 => child_indent,
                    _ => indent,
                };
                parent_end = Some((index, child_indent));
            }
        }
        if full == key {
            let end = comment_start(body, &['#']);
            let value_region = &body[indent + colon + 1..end.max(indent + colon + 1)];
            let value_start =
                indent + colon + 1 + (value_region.len() - value_region.trim_start().len());
            let value_end = value_start + body[value_start..end.max(value_start)].trim_end().len();
            found = Some((index, value_start, value_end));
            break;
        }
        stack.push((indent, name));
    }
    match (found, value) {
        (Some((line, start, end)), Some(value)) => {
            if start == end {
                return Err(format!("key {key:?} is a mapping, not a scalar"));
            }
            let old = &lines[line][start..end];
            let text = scalar_text(value)?;
            let new =
                if old.starts_with(['"', '\'']) || text.contains([':', '#']) || text.is_empty() {
                    quote_like(
                        if old.starts_with('\'') { old } else { "\"\"" },
                        &text,
                        ConfigFormat::Yaml,
                    )
                } else {
                    text
                };
            let current = lines[line].clone();
            lines[line] = format!("{}{}{}", &current[..start], new, &current[end..]);
        }
        (Some((line, _, _)), None) => {
            lines.remove(line);
        }
        (None, None) => return Err(format!("key {key:?} does not exist")),
        (None, Some(value)) => {
            let name = key.rsplit('.').next().unwrap_or(key);
            let new_line = format!("{name}: {}\n", scalar_text(value)?);
            if let Some(last) = lines.last_mut().filter(|last| !last.ends_with('\n')) {
                last.push('\n');
            }
            match (wanted_parent, parent_end) {
                (None, _) => lines.push(new_line),
                (Some(_), Some((after, indent))) => {
                    lines.insert(after + 1, format!("{}{new_line}", " ".repeat(indent)));
                }
                (Some(parent), None) => {
                    return Err(format!(
                        "mapping {parent:?} does not exist (new nested YAML mappings are not added; use put_file)"
                    ));
                }
            }
        }
    }
    Ok(lines.concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_capture::config::parse;
    use serde_json::json;

    fn keys(format: ConfigFormat, text: &str) -> Vec<(String, String)> {
        parse(format, text.as_bytes(), 1000).unwrap().1
    }

    #[test]
    fn toml_edits_keep_comments_and_layout() {
        let text = "# server settings\n[server]\nport = 8080 # the port\nhost = \"0.0.0.0\"\n";
        let edited = edit_key(ConfigFormat::Toml, text, "server.port", Some(&json!(9090))).unwrap();
        expect_test::expect![[r#"
            # server settings
            [server]
            port = 9090 # the port
            host = "0.0.0.0"
        "#]]
        .assert_eq(&edited);
        let added = edit_key(
            ConfigFormat::Toml,
            &edited,
            "log.level",
            Some(&json!("debug")),
        )
        .unwrap();
        assert!(keys(ConfigFormat::Toml, &added).contains(&("log.level".into(), "debug".into())));
        let removed = edit_key(ConfigFormat::Toml, text, "server.host", None).unwrap();
        assert_eq!(
            removed,
            "# server settings\n[server]\nport = 8080 # the port\n"
        );
        assert!(
            edit_key(ConfigFormat::Toml, text, "server.nope", None)
                .unwrap_err()
                .contains("does not exist")
        );
    }

    #[test]
    fn key_value_files_keep_their_style() {
        let redis = "# memory\nmaxmemory 100mb\nsave 900 1\nsave 300 10\nport 6379\n";
        let edited = edit_key(
            ConfigFormat::KeyValue,
            redis,
            "maxmemory",
            Some(&json!("200mb")),
        )
        .unwrap();
        assert_eq!(
            edited,
            "# memory\nmaxmemory 200mb\nsave 900 1\nsave 300 10\nport 6379\n"
        );
        let second = edit_key(
            ConfigFormat::KeyValue,
            redis,
            "save#2",
            Some(&json!("60 1000")),
        )
        .unwrap();
        assert!(second.contains("save 900 1\nsave 60 1000\n"));
        let added = edit_key(
            ConfigFormat::KeyValue,
            redis,
            "appendonly",
            Some(&json!("yes")),
        )
        .unwrap();
        assert!(added.ends_with("port 6379\nappendonly yes\n"));

        let postgres = "max_connections = 100\t\t# (change requires restart)\nlisten_addresses = 'localhost'\n";
        let edited = edit_key(
            ConfigFormat::KeyValue,
            postgres,
            "listen_addresses",
            Some(&json!("*")),
        )
        .unwrap();
        assert_eq!(
            edited,
            "max_connections = 100\t\t# (change requires restart)\nlisten_addresses = '*'\n"
        );
        let edited = edit_key(
            ConfigFormat::KeyValue,
            postgres,
            "max_connections",
            Some(&json!(200)),
        )
        .unwrap();
        assert!(edited.starts_with("max_connections = 200\t\t# (change requires restart)\n"));
        let added = edit_key(
            ConfigFormat::KeyValue,
            postgres,
            "work_mem",
            Some(&json!("8MB")),
        )
        .unwrap();
        assert!(added.ends_with("work_mem = 8MB\n"));
        let removed = edit_key(ConfigFormat::KeyValue, postgres, "max_connections", None).unwrap();
        assert_eq!(removed, "listen_addresses = 'localhost'\n");
    }

    #[test]
    fn ini_env_yaml_and_json_edits() {
        let ini = "; top\n[mysqld]\nport = 3306 ; the port\n\n[client]\nuser = app\n";
        let edited = edit_key(ConfigFormat::Ini, ini, "mysqld.port", Some(&json!(3307))).unwrap();
        assert_eq!(
            edited,
            "; top\n[mysqld]\nport = 3307 ; the port\n\n[client]\nuser = app\n"
        );
        let added = edit_key(
            ConfigFormat::Ini,
            ini,
            "mysqld.bind",
            Some(&json!("127.0.0.1")),
        )
        .unwrap();
        assert!(
            keys(ConfigFormat::Ini, &added).contains(&("mysqld.bind".into(), "127.0.0.1".into()))
        );

        let env = "export DB_HOST=db # primary\nDB_PORT=5432\n";
        let edited = edit_key(ConfigFormat::Env, env, "DB_HOST", Some(&json!("db2"))).unwrap();
        assert_eq!(edited, "export DB_HOST=db2 # primary\nDB_PORT=5432\n");

        let yaml = "server:\n  port: 8080 # public\n  tls:\n    enabled: false\nname: web\n";
        let edited = edit_key(
            ConfigFormat::Yaml,
            yaml,
            "server.tls.enabled",
            Some(&json!(true)),
        )
        .unwrap();
        assert_eq!(
            edited,
            "server:\n  port: 8080 # public\n  tls:\n    enabled: true\nname: web\n"
        );
        let edited = edit_key(ConfigFormat::Yaml, yaml, "server.port", Some(&json!(9090))).unwrap();
        assert!(edited.contains("  port: 9090 # public\n"));
        let added = edit_key(ConfigFormat::Yaml, yaml, "server.workers", Some(&json!(4))).unwrap();
        assert!(
            keys(ConfigFormat::Yaml, &added).contains(&("server.workers".into(), "4".into())),
            "{added}"
        );
        assert!(edit_key(ConfigFormat::Yaml, yaml, "nope.x", Some(&json!(1))).is_err());

        let json_text = "{\n  \"b\": 1,\n  \"a\": {\"c\": true}\n}\n";
        let edited = edit_key(ConfigFormat::Json, json_text, "a.c", Some(&json!(false))).unwrap();
        assert_eq!(
            edited,
            "{\n  \"b\": 1,\n  \"a\": {\n    \"c\": false\n  }\n}\n"
        );
    }
}
