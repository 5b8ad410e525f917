//! The cluster's deployment files as an operator uses them. Every YAML document under
//! `deploy/` parses. `deploy/compose/compose.yaml`: each node service names an existing
//! configuration file, its own named volume on the data directory and the cluster secret,
//! and the `form` service waits for every node and runs `kairos-form` on each.
//! `deploy/kubernetes/kairos.yaml`: every document has apiVersion, kind and a name; the
//! StatefulSet's serviceName is the headless Service; the Services', StatefulSet's and
//! PodDisruptionBudget's selectors match the pod labels; Service ports and probes reach a
//! container port. Each node configuration — compose's files, and the ConfigMap's template
//! rendered by its own `render.sh` with the environment the StatefulSet gives a pod — is
//! accepted by Kairos's configuration loader with the node id, advertised URL, peers, listen
//! port, data directory and secret path the files around it say (so is the member
//! configuration deploy/README.md writes for the systemd unit). The unit reads as INI with
//! its three sections and passes `systemd-analyze verify` where installed; every
//! script and shell snippet passes `sh -n`; the image copies only what its build context
//! keeps. Finally the compose `form` commands and the image's entrypoint form a cluster of
//! real nodes listening beyond loopback (so every request needs a token), idempotently, and
//! the README's operator-and-revoke step works. `docker compose config` and `kubectl apply
//! --dry-run=client` run as well where they can (a compose plugin; a cluster that answers).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::Duration;

use kairos_tests::{Kairos, free_port, kairos_bin, wait_for};
use serde_yaml::Value;

/// The secret written for every loaded configuration.
const SECRET: &str = "0123456789abcdef0123456789abcdef";
/// The namespace pods are rendered in.
const NAMESPACE: &str = "kairos-test";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Each YAML document of a file (split at `---` lines), parsed with serde_yaml and with its
/// `<<` merge keys applied; documents holding only comments are left out.
fn yaml_documents(relative: &str) -> Vec<Value> {
    let text = read(relative);
    let mut parts = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            parts.push(String::new());
        } else {
            let part = parts.last_mut().expect("one part at least");
            part.push_str(line);
            part.push('\n');
        }
    }
    parts
        .iter()
        .map(|part| {
            let mut value: Value =
                serde_yaml::from_str(part).unwrap_or_else(|e| panic!("{relative}: not YAML: {e}"));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{relative}: merge keys: {e}"));
            value
        })
        .filter(|value| !value.is_null())
        .collect()
}

/// The string at `path` (keys separated by `.`) in `value`.
fn text_at<'a>(value: &'a Value, path: &str) -> &'a str {
    path.split('.')
        .fold(value, |value, key| &value[key])
        .as_str()
        .unwrap_or_else(|| panic!("no string at {path}"))
}

/// A mapping's keys and values as strings (other values as their YAML text).
fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .unwrap_or_else(|| panic!("not a mapping: {value:?}"))
        .iter()
        .map(|(key, value)| {
            let value = match value {
                Value::String(text) => text.clone(),
                other => serde_yaml::to_string(other).unwrap().trim().to_string(),
            };
            (key.as_str().expect("a string key").to_string(), value)
        })
        .collect()
}

/// Whether every label of `selector` is on `labels`.
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let selector = string_map(selector);
    !selector.is_empty()
        && selector
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
}

/// Runs `sh -n` on a script's text: it parses as the image's /bin/sh (dash) reads it.
fn assert_shell_parses(what: &str, script: &str) {
    let output = Command::new("sh")
        .args(["-n", "-c", script])
        .output()
        .expect("sh runs");
    assert!(
        output.status.success(),
        "{what} does not parse: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn command_exists(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Loads a node configuration as `kairos up --config FILE` would, with the secret file it
/// names (`secret_in_container`, a path inside the container) written to a temporary
/// directory and the configuration pointed there.
fn load_node_config(what: &str, text: &str, secret_in_container: &str) -> kairos_config::Config {
    let named = format!("secret_file = \"{secret_in_container}\"");
    assert!(
        text.contains(&named),
        "{what} reads its secret from {secret_in_container}:\n{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("cluster-secret");
    std::fs::write(&secret, SECRET).unwrap();
    let text = text.replace(&named, &format!("secret_file = \"{}\"", secret.display()));
    let path = dir.path().join("kairos.toml");
    std::fs::write(&path, &text).unwrap();
    let config = kairos_config::load(
        Some(&path),
        Vec::<(String, String)>::new(),
        &kairos_config::Flags::default(),
    )
    .unwrap_or_else(|e| panic!("{what} is refused by the configuration loader: {e}\n{text}"));
    let cluster = config.cluster.as_ref().expect("a [cluster] section");
    assert_eq!(cluster.secret.as_deref(), Some(SECRET), "{what}");
    config
}

/// The host and port of an `http://HOST:PORT` URL.
fn host_port(url: &str) -> (&str, u16) {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, port) = rest.split_once(':').expect("a port");
    (
        host,
        port.trim_end_matches('/').parse().expect("a port number"),
    )
}

// ---- compose ----

/// The node services of compose.yaml (`kairos-N`), in order.
fn compose_nodes(compose: &Value) -> Vec<(String, Value)> {
    compose["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .map(|(name, service)| (name.as_str().unwrap().to_string(), service.clone()))
        .filter(|(name, _)| name.starts_with("kairos-"))
        .collect()
}

/// The `form` service's script (its command, run by `sh -c`).
fn compose_form_script(compose: &Value) -> String {
    let form = &compose["services"]["form"];
    assert_eq!(
        form["entrypoint"],
        serde_yaml::from_str::<Value>("[/bin/sh, -c]").unwrap()
    );
    form["command"][0]
        .as_str()
        .expect("one command string")
        .to_string()
}

fn compose_document() -> Value {
    let mut documents = yaml_documents("deploy/compose/compose.yaml");
    assert_eq!(documents.len(), 1);
    documents.remove(0)
}

#[test]
fn every_yaml_document_under_deploy_parses() {
    let mut files = Vec::new();
    let mut directories = vec![repo().join("deploy")];
    while let Some(directory) = directories.pop() {
        for entry in std::fs::read_dir(&directory).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                directories.push(path);
            } else if path
                .extension()
                .is_some_and(|extension| extension == "yaml" || extension == "yml")
            {
                files.push(path);
            }
        }
    }
    files.sort();
    let relative: Vec<String> = files
        .iter()
        .map(|path| {
            path.strip_prefix(repo())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for expected in [
        "deploy/compose/compose.yaml",
        "deploy/kubernetes/kairos.yaml",
    ] {
        assert!(relative.iter().any(|file| file == expected), "{relative:?}");
    }
    for file in &relative {
        assert!(!yaml_documents(file).is_empty(), "{file} has a document");
    }
}

#[test]
fn compose_nodes_each_have_their_config_volume_and_secret_and_the_configs_load() {
    let compose = compose_document();
    let top = |key: &str| -> Vec<String> {
        compose[key]
            .as_mapping()
            .unwrap_or_else(|| panic!("a top-level {key}"))
            .keys()
            .map(|key| key.as_str().unwrap().to_string())
            .collect()
    };
    let (configs, volumes, secrets, networks) = (
        top("configs"),
        top("volumes"),
        top("secrets"),
        top("networks"),
    );
    let dockerfile = read("deploy/compose/Dockerfile");
    let nodes = compose_nodes(&compose);
    assert_eq!(
        nodes
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>(),
        ["kairos-1", "kairos-2", "kairos-3"]
    );
    let advertised: Vec<String> = nodes
        .iter()
        .map(|(name, _)| format!("http://{name}:7700"))
        .collect();
    for (index, (name, service)) in nodes.iter().enumerate() {
        assert_eq!(text_at(service, "image"), "kairos:latest", "{name}");
        assert_eq!(text_at(service, "hostname"), name);
        assert!(
            service["healthcheck"]["test"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|word| word.as_str() == Some("http://127.0.0.1:7700/api/health")),
            "{name} is healthy once /api/health answers"
        );
        for network in service["networks"].as_sequence().unwrap() {
            assert!(networks.contains(&network.as_str().unwrap().to_string()));
        }
        // Its configuration: a top-level config from an existing file, mounted where the
        // image's entrypoint reads it by default (the Dockerfile's CMD).
        let mounted = service["configs"].as_sequence().unwrap();
        assert_eq!(mounted.len(), 1, "{name}");
        let source = text_at(&mounted[0], "source");
        let target = text_at(&mounted[0], "target");
        assert!(configs.contains(&source.to_string()), "{name}: {source}");
        assert!(
            dockerfile.contains(&format!("CMD [\"{target}\"]")),
            "{name}'s config is at the entrypoint's default path"
        );
        let file = text_at(&compose["configs"][source], "file");
        let config_text = read(&format!("deploy/compose/{file}"));
        // Its volume: a named volume of its own on the data directory.
        let mounts: Vec<&str> = service["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|mount| mount.as_str().unwrap())
            .collect();
        assert_eq!(mounts.len(), 1, "{name}");
        let (volume, data_dir) = mounts[0].split_once(':').unwrap();
        assert!(volumes.contains(&volume.to_string()), "{name}: {volume}");
        assert_eq!(volume, format!("{name}-data"));
        // Its secret, at /run/secrets/NAME, where its configuration reads it.
        let used: Vec<&str> = service["secrets"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|secret| secret.as_str().unwrap())
            .collect();
        assert_eq!(used, ["cluster_secret"], "{name}");
        assert!(secrets.contains(&"cluster_secret".to_string()));
        let config = load_node_config(
            &format!("deploy/compose/{file}"),
            &config_text,
            "/run/secrets/cluster_secret",
        );
        let cluster = config.cluster.as_ref().unwrap();
        assert_eq!(cluster.node_id, index as u64 + 1, "{file}");
        assert_eq!(
            cluster.advertise.as_deref(),
            Some(advertised[index].as_str())
        );
        let others: Vec<String> = advertised
            .iter()
            .filter(|url| **url != advertised[index])
            .cloned()
            .collect();
        assert_eq!(cluster.peers, others, "{file}");
        assert_eq!(config.node.data_dir, Path::new(data_dir), "{file}");
        assert_eq!(config.node.listen.port(), 7700, "{file}");
        assert!(config.node.allowed_hosts.contains(name), "{file}");
        // Published on this host only, to the port the node listens on.
        let published = service["ports"][0].as_str().expect("a published port");
        assert_eq!(
            published,
            format!("127.0.0.1:{}:{}", 7701 + index, config.node.listen.port())
        );
    }
    let secret_file = text_at(&compose["secrets"]["cluster_secret"], "file");
    assert!(
        read("deploy/compose/.gitignore")
            .lines()
            .any(|line| Some(line) == secret_file.strip_prefix("./")),
        "the secret file is never committed"
    );

    // The one-shot: after every node is healthy, with every node's volume read-only, one
    // kairos-form per node, the first without and the others with the first's URL.
    let form = &compose["services"]["form"];
    assert_eq!(text_at(form, "restart"), "no");
    for (index, (name, _)) in nodes.iter().enumerate() {
        assert_eq!(
            text_at(&form["depends_on"][name.as_str()], "condition"),
            "service_healthy"
        );
        let mount = format!("{name}-data:/nodes/{}:ro", index + 1);
        assert!(
            form["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|volume| volume.as_str() == Some(mount.as_str())),
            "form mounts {mount}"
        );
    }
    let script = compose_form_script(&compose);
    assert_shell_parses("the form service's command", &script);
    let lines: Vec<&str> = script
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("kairos-form "))
        .collect();
    let expected: Vec<String> = advertised
        .iter()
        .enumerate()
        .map(|(index, url)| {
            let token = format!("/nodes/{}/bootstrap-token", index + 1);
            match index {
                0 => format!("kairos-form {url} {token}"),
                _ => format!("kairos-form {url} {token} {}", advertised[0]),
            }
        })
        .collect();
    assert_eq!(lines, expected);

    // Docker's own reading of the file, where the compose plugin is installed.
    let compose_plugin = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if compose_plugin {
        let copy = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(repo().join("deploy/compose")).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
        }
        std::fs::write(copy.path().join("cluster-secret"), SECRET).unwrap();
        let output = Command::new("docker")
            .args(["compose", "-f"])
            .arg(copy.path().join("compose.yaml"))
            .args(["config", "--quiet"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "docker compose config: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

// ---- Kubernetes ----

/// The documents of kairos.yaml by kind (Services: both).
struct Manifests {
    documents: Vec<Value>,
}

impl Manifests {
    fn read() -> Manifests {
        Manifests {
            documents: yaml_documents("deploy/kubernetes/kairos.yaml"),
        }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.documents
            .iter()
            .filter(|document| document["kind"].as_str() == Some(kind))
            .collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "one {kind}");
        found[0]
    }

    fn container(&self) -> &Value {
        let containers = &self.one("StatefulSet")["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers.as_sequence().unwrap().len(), 1);
        &containers[0]
    }

    fn config_map_file(&self, key: &str) -> String {
        // A key with dots in it: not a path for text_at.
        self.one("ConfigMap")["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("the ConfigMap has {key}"))
            .to_string()
    }

    /// The mount path of the pod volume or claim `name`.
    fn mount_path(&self, volume: &str) -> String {
        self.container()["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|mount| mount["name"].as_str() == Some(volume))
            .map(|mount| text_at(mount, "mountPath").to_string())
            .unwrap_or_else(|| panic!("volume {volume} is mounted"))
    }

    /// The container's environment in a pod named `pod` of NAMESPACE: field references
    /// resolved, then `$(VAR)` references expanded as the kubelet does.
    fn pod_environment(&self, pod: &str) -> BTreeMap<String, String> {
        let mut environment: BTreeMap<String, String> = BTreeMap::new();
        for variable in self.container()["env"].as_sequence().unwrap() {
            let name = text_at(variable, "name").to_string();
            let value = match variable["value"].as_str() {
                Some(value) => {
                    let mut expanded = value.to_string();
                    for (known, known_value) in &environment {
                        expanded = expanded.replace(&format!("$({known})"), known_value);
                    }
                    assert!(!expanded.contains("$("), "{name}: {expanded}");
                    expanded
                }
                None => match text_at(variable, "valueFrom.fieldRef.fieldPath") {
                    "metadata.name" => pod.to_string(),
                    "metadata.namespace" => NAMESPACE.to_string(),
                    other => panic!("{name}: field {other}"),
                },
            };
            environment.insert(name, value);
        }
        environment
    }

    /// The configuration `render.sh` writes for pod `kairos-ORDINAL`, run with the pod's
    /// environment.
    fn render(&self, ordinal: u32) -> String {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("kairos.toml.in");
        std::fs::write(&template, self.config_map_file("kairos.toml.in")).unwrap();
        let output = Command::new("sh")
            .args(["-c", &self.config_map_file("render.sh")])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.pod_environment(&format!("kairos-{ordinal}")))
            .env("KAIROS_TEMPLATE", &template)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "render.sh for kairos-{ordinal}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }
}

#[test]
fn kubernetes_objects_fit_together_and_each_pods_rendered_config_loads() {
    let manifests = Manifests::read();
    for document in &manifests.documents {
        for field in ["apiVersion", "kind", "metadata.name"] {
            assert!(
                !text_at(document, field).is_empty(),
                "{field} in {document:?}"
            );
        }
    }
    let kinds: Vec<&str> = manifests
        .documents
        .iter()
        .map(|document| text_at(document, "kind"))
        .collect();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "Service",
            "Service",
            "StatefulSet",
            "PodDisruptionBudget"
        ]
    );
    let set = manifests.one("StatefulSet");
    let services = manifests.all("Service");
    let headless = services
        .iter()
        .find(|service| service["spec"]["clusterIP"].as_str() == Some("None"))
        .expect("a headless Service");
    let client = services
        .iter()
        .find(|service| service["spec"]["clusterIP"].as_str() != Some("None"))
        .expect("a client Service");
    assert_eq!(text_at(headless, "metadata.name"), "kairos-peers");
    assert_eq!(
        headless["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true)
    );
    assert_eq!(
        text_at(set, "spec.serviceName"),
        text_at(headless, "metadata.name")
    );
    assert_eq!(set["spec"]["replicas"].as_u64(), Some(3));

    // Selectors: the StatefulSet's, both Services' and the budget's pick the pods.
    let labels = string_map(&set["spec"]["template"]["metadata"]["labels"]);
    assert!(selects(&set["spec"]["selector"]["matchLabels"], &labels));
    for service in &services {
        assert!(selects(&service["spec"]["selector"], &labels));
    }
    let budget = manifests.one("PodDisruptionBudget");
    assert!(selects(&budget["spec"]["selector"]["matchLabels"], &labels));
    assert_eq!(budget["spec"]["maxUnavailable"].as_u64(), Some(1));

    // Ports: every Service port and probe reaches a container port.
    let container = manifests.container();
    let container_ports: BTreeMap<String, u64> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|port| {
            (
                text_at(port, "name").to_string(),
                port["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    let resolve = |port: &Value| -> u64 {
        match port {
            Value::String(name) => *container_ports
                .get(name)
                .unwrap_or_else(|| panic!("no container port named {name}")),
            Value::Number(number) => {
                let number = number.as_u64().unwrap();
                assert!(container_ports.values().any(|port| *port == number));
                number
            }
            other => panic!("a port: {other:?}"),
        }
    };
    for service in [headless, client] {
        for port in service["spec"]["ports"].as_sequence().unwrap() {
            let target = resolve(&port["targetPort"]);
            assert_eq!(port["port"].as_u64(), Some(target));
        }
    }
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        assert_eq!(text_at(get, "path"), "/api/health", "{probe}");
        resolve(&get["port"]);
        // The node answers only Host names it knows.
        let headers = get["httpHeaders"].as_sequence().unwrap();
        assert!(
            headers
                .iter()
                .any(|header| header["name"].as_str() == Some("Host")
                    && header["value"].as_str() == Some("localhost")),
            "{probe} names a host the node answers"
        );
    }

    // Volumes: the data claim, the ConfigMap and the Secret, mounted.
    let claims = set["spec"]["volumeClaimTemplates"].as_sequence().unwrap();
    assert_eq!(claims.len(), 1);
    let claim = text_at(&claims[0], "metadata.name");
    let pod_volumes = set["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap();
    for mount in container["volumeMounts"].as_sequence().unwrap() {
        let name = text_at(mount, "name");
        assert!(
            name == claim
                || pod_volumes
                    .iter()
                    .any(|volume| volume["name"].as_str() == Some(name)),
            "mount {name} names a volume"
        );
    }
    let volume_of = |key: &str| -> &Value {
        pod_volumes
            .iter()
            .find(|volume| !volume[key].is_null())
            .unwrap_or_else(|| panic!("a {key} volume"))
    };
    let template_volume = volume_of("configMap");
    assert_eq!(
        text_at(template_volume, "configMap.name"),
        text_at(manifests.one("ConfigMap"), "metadata.name")
    );
    let secret_volume = volume_of("secret");
    assert_eq!(
        text_at(secret_volume, "secret.secretName"),
        "kairos-cluster-secret"
    );
    let secret_dir = manifests.mount_path(text_at(secret_volume, "name"));
    let template_dir = manifests.mount_path(text_at(template_volume, "name"));

    // The entrypoint snippet renders the template from where the ConfigMap is mounted.
    let snippet = container["args"][0].as_str().expect("one script in args");
    assert_shell_parses("the StatefulSet's entrypoint snippet", snippet);
    assert!(snippet.contains(&format!("sh {template_dir}/render.sh > ")));
    assert_shell_parses("render.sh", &manifests.config_map_file("render.sh"));

    // Each pod's configuration, as render.sh writes it, loads: node id = ordinal + 1, the
    // advertised URL its name under the headless Service, kairos-0 its one peer.
    let first = format!("http://kairos-0.kairos-peers.{NAMESPACE}.svc:7700");
    for ordinal in [0, 1, 2, 4] {
        let text = manifests.render(ordinal);
        assert!(
            !text.contains('@'),
            "kairos-{ordinal}: a field left:\n{text}"
        );
        let secret_file = text
            .lines()
            .find_map(|line| line.strip_prefix("secret_file = \""))
            .and_then(|rest| rest.strip_suffix('"'))
            .expect("a secret_file");
        assert!(
            Path::new(secret_file).parent() == Some(Path::new(&secret_dir)),
            "the secret is read from the Secret's mount: {secret_file}"
        );
        let config = load_node_config(&format!("kairos-{ordinal}"), &text, secret_file);
        let cluster = config.cluster.as_ref().unwrap();
        let advertise = format!("http://kairos-{ordinal}.kairos-peers.{NAMESPACE}.svc:7700");
        assert_eq!(cluster.node_id, u64::from(ordinal) + 1);
        assert_eq!(cluster.advertise.as_deref(), Some(advertise.as_str()));
        assert_eq!(
            manifests.pod_environment(&format!("kairos-{ordinal}"))["KAIROS_ADVERTISE"],
            advertise
        );
        let peers: &[String] = if ordinal == 0 {
            &[]
        } else {
            std::slice::from_ref(&first)
        };
        assert_eq!(cluster.peers, peers);
        let (host, port) = host_port(&advertise);
        assert!(
            config
                .node
                .allowed_hosts
                .iter()
                .any(|allowed| allowed == host)
        );
        assert!(
            config
                .node
                .allowed_hosts
                .iter()
                .any(|allowed| allowed == text_at(client, "metadata.name")),
            "the client Service's name is answered"
        );
        assert_eq!(u64::from(port), container_ports["http"]);
        assert_eq!(
            u64::from(config.node.listen.port()),
            container_ports["http"]
        );
        assert_eq!(
            config.node.data_dir,
            Path::new(&manifests.mount_path(claim))
        );
    }

    // kubectl's own reading, where a cluster answers (a client-side dry run still asks the
    // server for its API).
    let cluster_answers = command_exists("kubectl")
        && Command::new("kubectl")
            .args(["version", "--request-timeout=5s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
    if cluster_answers {
        let output = Command::new("kubectl")
            .args(["apply", "--dry-run=client", "-f"])
            .arg(repo().join("deploy/kubernetes/kairos.yaml"))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "kubectl apply --dry-run=client: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

// ---- systemd ----

/// A unit file's sections and their keys, read as INI (comments and blank lines skipped).
fn ini_sections(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            sections.entry(name.to_string()).or_default();
            current = Some(name.to_string());
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line:?}"));
        let section = current.clone().expect("a key inside a section");
        sections
            .get_mut(&section)
            .unwrap()
            .push((key.trim().to_string(), value.trim().to_string()));
    }
    sections
}

#[test]
fn the_cluster_unit_runs_a_member_per_configuration_and_verifies() {
    let name = "kairos-cluster@.service";
    let text = read(&format!("deploy/systemd/{name}"));
    let sections = ini_sections(&text);
    assert_eq!(
        sections.keys().map(String::as_str).collect::<Vec<_>>(),
        ["Install", "Service", "Unit"]
    );
    let value = |section: &str, key: &str| -> String {
        sections[section]
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.clone())
            .unwrap_or_else(|| panic!("[{section}] {key}"))
    };
    let start = value("Service", "ExecStart");
    assert_eq!(
        start,
        "/usr/local/bin/kairos up --config /etc/kairos/cluster-%i.toml --data-dir /var/lib/kairos/cluster-%i"
    );
    assert_eq!(value("Service", "StateDirectory"), "kairos/cluster-%i");
    assert_eq!(value("Install", "WantedBy"), "multi-user.target");

    // The configuration deploy/README.md writes for member N, at the path the unit reads
    // for instance N, loads (as member 2).
    let readme = read("deploy/README.md");
    let heredoc = "cat > /etc/kairos/cluster-N.toml <<'END'\n";
    assert!(start.contains("/etc/kairos/cluster-%i.toml"));
    let begin = readme
        .find(heredoc)
        .expect("deploy/README.md writes cluster-N.toml")
        + heredoc.len();
    let end = begin + readme[begin..].find("\nEND\n").expect("the heredoc ends");
    let member = readme[begin..end]
        .replace("kairos-N.", "kairos-2.")
        .replace("node_id = N", "node_id = 2");
    let config = load_node_config(
        "deploy/README.md's cluster-N.toml",
        &member,
        "/etc/kairos/cluster-secret",
    );
    let cluster = config.cluster.as_ref().unwrap();
    assert_eq!(cluster.node_id, 2);
    let advertise = cluster.advertise.as_deref().unwrap();
    assert_eq!(advertise, "http://kairos-2.example.internal:7700");
    assert!(
        config
            .node
            .allowed_hosts
            .iter()
            .any(|host| host == host_port(advertise).0)
    );

    // The man pages it names are ones kairos generates.
    let pages = tempfile::tempdir().unwrap();
    Kairos::new().ok(["man", "--dir", pages.path().to_str().unwrap()]);
    for reference in value("Unit", "Documentation").split_whitespace() {
        let page = reference
            .strip_prefix("man:")
            .and_then(|page| page.strip_suffix("(1)"))
            .unwrap_or_else(|| panic!("{reference} is not man:PAGE(1)"));
        assert!(
            pages.path().join(format!("{page}.1")).is_file(),
            "{page}(1)"
        );
    }

    // systemd's own reading of an instance, with the binary where this build put it.
    if command_exists("systemd-analyze") {
        let dir = tempfile::tempdir().unwrap();
        let instance = dir.path().join("kairos-cluster@1.service");
        std::fs::write(
            &instance,
            text.replace("/usr/local/bin/kairos", &kairos_bin().display().to_string()),
        )
        .unwrap();
        let output = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&instance)
            .output()
            .unwrap();
        assert!(
            output.status.success() && output.stderr.is_empty(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

// ---- scripts and the image ----

#[test]
fn the_scripts_parse_and_the_image_copies_what_its_context_keeps() {
    for script in ["kairos-entrypoint", "kairos-form"] {
        let path = repo().join("deploy/compose").join(script);
        assert_shell_parses(script, &read(&format!("deploy/compose/{script}")));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "{script} is executable");
    }

    // The Dockerfile: instructions joined over continuation lines.
    let dockerfile = read("deploy/compose/Dockerfile");
    let mut instructions: Vec<String> = Vec::new();
    let mut continued = false;
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if !continued && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        let (body, continues) = match trimmed.strip_suffix('\\') {
            Some(body) => (body.trim_end(), true),
            None => (trimmed, false),
        };
        if continued {
            let last = instructions.last_mut().unwrap();
            last.push(' ');
            last.push_str(body);
        } else {
            instructions.push(body.to_string());
        }
        continued = continues;
    }
    assert_eq!(instructions[0], "FROM debian:bookworm-slim");
    let kept: Vec<String> = read("deploy/compose/Dockerfile.dockerignore")
        .lines()
        .filter_map(|line| line.strip_prefix('!'))
        .map(str::to_string)
        .collect();
    let mut copied = Vec::new();
    for instruction in &instructions {
        let (word, rest) = instruction.split_once(' ').unwrap();
        match word {
            "RUN" => assert_shell_parses(instruction, rest),
            "COPY" => {
                let words: Vec<&str> = rest
                    .split_whitespace()
                    .filter(|word| !word.starts_with("--"))
                    .collect();
                let (_destination, sources) = words.split_last().unwrap();
                for source in sources {
                    assert!(
                        kept.iter().any(|kept| kept == source),
                        "{source} is in the build context"
                    );
                    if *source != "target/release/kairos" {
                        assert!(repo().join(source).is_file(), "{source} exists");
                    }
                    copied.push(source.to_string());
                }
            }
            _ => {}
        }
    }
    copied.sort();
    let mut kept_sorted = kept.clone();
    kept_sorted.sort();
    assert_eq!(copied, kept_sorted, "the context holds only what is copied");
    assert!(instructions.contains(
        &"ENTRYPOINT [\"/usr/bin/tini\", \"--\", \"/usr/local/bin/kairos-entrypoint\"]".to_string()
    ));
}

// ---- a cluster formed by the scripts ----

/// `deploy/compose/kairos-entrypoint CONFIG` with its data directory, as the image runs it
/// (kairos and the scripts on PATH); stopped with SIGTERM when dropped.
struct EntrypointNode {
    child: Child,
    _stdout: std::io::BufReader<ChildStdout>,
}

/// kairos's directory and deploy/compose, then the inherited PATH.
fn scripts_path() -> String {
    format!(
        "{}:{}:{}",
        kairos_bin().parent().unwrap().display(),
        repo().join("deploy/compose").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

impl EntrypointNode {
    fn start(config: &Path, data_dir: &Path, environment: &[(&str, &str)]) -> EntrypointNode {
        let mut child = Command::new(repo().join("deploy/compose/kairos-entrypoint"))
            .arg(config)
            .env("PATH", scripts_path())
            .env("KAIROS_DATA_DIR", data_dir)
            .env("KAIROS_FORM_TIMEOUT", "60")
            .env_remove("KAIROS_NODE")
            .env_remove("KAIROS_TOKEN")
            .env_remove("KAIROS_FORM")
            .env_remove("KAIROS_ADVERTISE")
            .env_remove("KAIROS_FORM_NODE")
            .env_remove("KAIROS_CLUSTER_SECRET")
            .envs(environment.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("kairos-entrypoint starts");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("listening on http://0.0.0.0:"),
            "kairos-entrypoint {}: {line:?}",
            config.display()
        );
        EntrypointNode {
            child,
            _stdout: stdout,
        }
    }
}

impl Drop for EntrypointNode {
    fn drop(&mut self) {
        // The entrypoint execs kairos up: this is the node's pid.
        // SAFETY: kill(2) takes only a pid and a signal number; no memory is shared with the callee.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// `kairos --node URL --token TOKEN ARGS...`.
fn through(url: &str, token: &str, args: &[&str]) -> Output {
    Command::new(kairos_bin())
        .args(["--node", url, "--token", token])
        .args(args)
        .env_remove("KAIROS_DATA_DIR")
        .output()
        .unwrap()
}

/// The members (API URL, state) the node at `url` reports, if it answers.
fn members(url: &str, token: &str) -> Option<Vec<(String, String)>> {
    let output = through(url, token, &["cluster", "status", "--json"]);
    if !output.status.success() {
        return None;
    }
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let mut members: Vec<(String, String)> = status["members"]
        .as_array()?
        .iter()
        .map(|member| {
            (
                member["api"].as_str().unwrap_or_default().to_string(),
                member["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    members.sort();
    Some(members)
}

/// Runs the compose `form` script with its URLs and volume paths replaced by these nodes'.
fn run_form(script: &str, urls: &[String], data_dirs: &[PathBuf]) -> Output {
    let mut script = script.to_string();
    for (index, (url, data_dir)) in urls.iter().zip(data_dirs).enumerate() {
        script = script
            .replace(&format!("http://kairos-{}:7700", index + 1), url)
            .replace(
                &format!("/nodes/{}/", index + 1),
                &format!("{}/", data_dir.display()),
            );
    }
    Command::new("sh")
        .args(["-c", &script])
        .env("PATH", scripts_path())
        .env("KAIROS_FORM_TIMEOUT", "60")
        .env_remove("KAIROS_TOKEN")
        .env_remove("KAIROS_NODE")
        .env_remove("KAIROS_ADVERTISE")
        .output()
        .unwrap()
}

fn token_of(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("bootstrap-token"))
        .expect("the entrypoint kept the bootstrap token")
        .trim()
        .to_string()
}

#[test]
fn the_form_service_and_the_pods_entrypoint_form_a_cluster_beyond_loopback() {
    let work = tempfile::tempdir().unwrap();
    let secret = work.path().join("cluster-secret");
    std::fs::write(&secret, SECRET).unwrap();
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|port| format!("http://127.0.0.1:{port}"))
        .collect();
    let data_dirs: Vec<PathBuf> = (1..=4)
        .map(|n| work.path().join(format!("data-{n}")))
        .collect();

    // The three compose nodes, each on 0.0.0.0 (beyond loopback: tokens needed) at its own
    // port, the compose names replaced by this host's URLs.
    let compose = compose_document();
    let mut nodes = Vec::new();
    for (index, (name, service)) in compose_nodes(&compose).iter().enumerate() {
        let file = text_at(
            &compose["configs"][text_at(&service["configs"][0], "source")],
            "file",
        );
        let mut text = read(&format!("deploy/compose/{file}"))
            .replace(
                "listen = \"0.0.0.0:7700\"",
                &format!("listen = \"0.0.0.0:{}\"", ports[index]),
            )
            .replace("/run/secrets/cluster_secret", &secret.display().to_string());
        for (other, url) in urls.iter().take(3).enumerate() {
            text = text.replace(&format!("http://kairos-{}:7700", other + 1), url);
        }
        let config = work.path().join(format!("{name}.toml"));
        std::fs::write(&config, text).unwrap();
        nodes.push(EntrypointNode::start(&config, &data_dirs[index], &[]));
    }
    let token_1 = token_of(&data_dirs[0]);
    let unauthenticated = Command::new(kairos_bin())
        .args(["--node", &urls[0], "cluster", "status"])
        .env_remove("KAIROS_TOKEN")
        .output()
        .unwrap();
    assert!(!unauthenticated.status.success(), "a token is needed");

    // The form service's commands: node 1 inits, 2 and 3 join it.
    let script = compose_form_script(&compose);
    let formed = run_form(&script, &urls, &data_dirs);
    let log = String::from_utf8_lossy(&formed.stderr).into_owned();
    assert!(formed.status.success(), "form: {log}");
    assert!(log.contains("formed a new cluster"), "{log}");
    assert_eq!(log.matches("joined the cluster of").count(), 2, "{log}");
    let expected: Vec<(String, String)> = {
        let mut members: Vec<(String, String)> = urls[..3]
            .iter()
            .enumerate()
            .map(|(index, url)| {
                let state = if index == 0 { "leader" } else { "follower" };
                (url.clone(), state.to_string())
            })
            .collect();
        members.sort();
        members
    };
    let three = wait_for("three members", Duration::from_secs(30), || {
        members(&urls[0], &token_1).filter(|members| *members == expected)
    });
    assert_eq!(three.len(), 3);

    // Again, as at every `docker compose up`: nothing to do. The members that joined
    // started from a snapshot of the first one's catalog, which has its bootstrap party
    // only: their own bootstrap tokens name no party any more, which says they were made
    // members; the first one's token is good on every member.
    let again = run_form(&script, &urls, &data_dirs);
    let log = String::from_utf8_lossy(&again.stderr).into_owned();
    assert!(again.status.success(), "form again: {log}");
    assert_eq!(log.matches(": a member at ").count(), 1, "{log}");
    assert_eq!(
        log.matches("it was made a member, nothing to form").count(),
        2,
        "{log}"
    );
    assert!(!log.contains("joined") && !log.contains("formed"), "{log}");
    for url in &urls[..3] {
        let listed = through(url, &token_1, &["party", "list"]);
        assert!(listed.status.success(), "the first member's token on {url}");
    }

    // A fourth node as a pod runs it: the ConfigMap's template rendered for kairos-3, its
    // cluster names replaced by this host's URLs, and the entrypoint joining by itself.
    let manifests = Manifests::read();
    let pod = manifests.pod_environment("kairos-3");
    let text = manifests
        .render(3)
        .replace(
            "listen = \"0.0.0.0:7700\"",
            &format!("listen = \"0.0.0.0:{}\"", ports[3]),
        )
        .replace(&pod["KAIROS_ADVERTISE"], &urls[3])
        .replace(&pod["KAIROS_FIRST"], &urls[0])
        .replace(
            "/etc/kairos/secret/cluster-secret",
            &secret.display().to_string(),
        );
    let config = work.path().join("kairos-3.toml");
    std::fs::write(&config, text).unwrap();
    nodes.push(EntrypointNode::start(
        &config,
        &data_dirs[3],
        &[
            ("KAIROS_FORM", &urls[0]),
            ("KAIROS_ADVERTISE", &urls[3]),
            ("KAIROS_FORM_NODE", &urls[3]),
        ],
    ));
    wait_for("the pod to join", Duration::from_secs(60), || {
        members(&urls[0], &token_1).filter(|members| {
            members.len() == 4
                && members
                    .iter()
                    .any(|(api, state)| *api == urls[3] && state == "follower")
        })
    });

    // The READMEs' next step: an operator made through the cluster is a party on every
    // member; revoking `bootstrap` through any member ends every member's bootstrap token.
    let added = through(
        &urls[0],
        &token_1,
        &["party", "add", "operator", "--role", "admin", "--json"],
    );
    assert!(added.status.success());
    let operator: serde_json::Value = serde_json::from_slice(&added.stdout).unwrap();
    let operator = operator["token"].as_str().unwrap().to_string();
    let revoked = through(&urls[1], &operator, &["party", "revoke", "bootstrap"]);
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    for (url, data_dir) in urls.iter().zip(&data_dirs) {
        wait_for("the revocation everywhere", Duration::from_secs(10), || {
            let refused = through(url, &token_of(data_dir), &["party", "list"]);
            (!refused.status.success()).then_some(())
        });
        let listed = through(url, &operator, &["party", "list"]);
        assert!(listed.status.success(), "the operator acts on {url}");
    }
    // And the form service still finds nothing to do.
    let after = run_form(&script, &urls, &data_dirs);
    assert!(
        after.status.success(),
        "form after the revocation: {}",
        String::from_utf8_lossy(&after.stderr)
    );
    drop(nodes);
}
