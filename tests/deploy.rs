//! The deployment files in `conf/deploy/` agree with the configs they run and with Stitch: the
//! Kubernetes ConfigMap is `conf/kubernetes.yaml`, its probes and Service use that config's
//! ports, the image starts with that config, the systemd unit's paths are `conf/systemd.yaml`'s
//! and its reload checks before it upgrades, the listing token the systemd config offers works
//! from the unit's environment file, the pod's command line (the image's ENTRYPOINT with the
//! Deployment's command and args) is one Stitch accepts and reads the mounted ConfigMap, and every
//! metric the Grafana dashboard queries is one a running Stitch exposes.

mod common;

use common::*;
use serde::Deserialize;
use serde_yaml::Value;
use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn port(address: &Value) -> u64 {
    address
        .as_str()
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("an address with a port: {address:?}"))
}

/// The documents of a multi-document YAML file, by kind.
fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).unwrap())
        .collect()
}

/// The JSON array of a Containerfile instruction (`ENTRYPOINT [...]`, `CMD [...]`), if present.
fn exec_form(containerfile: &str, instruction: &str) -> Option<Vec<String>> {
    containerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{instruction} ")))
        .map(|json| serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}")))
}

fn strings(value: &Value) -> Option<Vec<String>> {
    value
        .as_sequence()
        .map(|s| s.iter().map(|v| v.as_str().unwrap().to_string()).collect())
}

/// `stitch ARGS check` by the real binary, with `env` set (`Some`) or removed (`None`) in its
/// environment only.
fn stitch_check(args: &[String], env: &[(&str, Option<&str>)]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_stitch"));
    command.args(args).arg("check");
    for (name, value) in env {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    command.output().unwrap()
}

fn kind<'a>(documents: &'a [Value], kind: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn the_kubernetes_example_runs_conf_kubernetes_yaml_with_its_ports_and_paths() {
    let config: Value = serde_yaml::from_str(&read("conf/kubernetes.yaml")).unwrap();
    let manifests = documents(&read("conf/deploy/kubernetes.yaml"));
    let mapped: Value = serde_yaml::from_str(
        kind(&manifests, "ConfigMap")["data"]["stitch.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(mapped, config, "the ConfigMap holds conf/kubernetes.yaml");

    let (listen, metrics) = (port(&config["listen"]), port(&config["metrics"]["listen"]));
    let pod = &kind(&manifests, "Deployment")["spec"]["template"];
    let containers = pod["spec"]["containers"].as_sequence().unwrap();
    let stitch = containers.iter().find(|c| c["name"] == "stitch").unwrap();
    let named = |name: &str| {
        stitch["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["containerPort"].as_u64().unwrap())
    };
    assert_eq!(named("http"), Some(listen));
    assert_eq!(named("metrics"), Some(metrics));
    assert_eq!(stitch["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(stitch["readinessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(stitch["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        metrics.to_string()
    );
    assert_eq!(stitch["securityContext"]["readOnlyRootFilesystem"], true);
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    let shutdown: u64 = config["shutdown_grace"]
        .as_str()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(grace > shutdown, "the pod waits longer than Stitch drains");
    // The upstream is the application container's port, on the pod's loopback.
    let app = containers.iter().find(|c| c["name"] == "app").unwrap();
    assert_eq!(
        app["ports"][0]["containerPort"].as_u64(),
        Some(port(&config["upstream"]))
    );
    // Mounts: the config where the image's entrypoint reads it, the volume at storage.dir.
    let mounts = stitch["volumeMounts"].as_sequence().unwrap();
    let mounted = |path: &str| mounts.iter().any(|m| m["mountPath"] == path);
    assert!(mounted("/etc/stitch"));
    assert!(mounted(config["storage"]["dir"].as_str().unwrap()));
    let service = kind(&manifests, "Service");
    let service_port = |name: &str| {
        service["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("the Service has no port {name}"))
    };
    assert_eq!(service_port("http")["targetPort"].as_u64(), Some(listen));
    assert_eq!(service_port("http")["port"].as_u64(), Some(80));
    assert_eq!(
        service_port("metrics")["targetPort"].as_u64(),
        Some(metrics)
    );
    // The Service selects the pod, and the ServiceMonitor the Service's metrics port.
    let labels = pod["metadata"]["labels"].as_mapping().unwrap();
    for (key, value) in service["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(labels.get(key), Some(value), "the Service selects the pod");
    }
    let monitor = kind(&manifests, "ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let service_labels = service["metadata"]["labels"].as_mapping().unwrap();
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(
            service_labels.get(key),
            Some(value),
            "the monitor selects the Service"
        );
    }
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
}

#[test]
fn the_pod_starts_stitch_once_with_the_mounted_config_map() {
    let manifests = documents(&read("conf/deploy/kubernetes.yaml"));
    let containerfile = read("conf/deploy/Containerfile");
    let config_map = kind(&manifests, "ConfigMap");
    let key = config_map["data"]
        .as_mapping()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    let pod = &kind(&manifests, "Deployment")["spec"]["template"]["spec"];
    let stitch = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "stitch")
        .unwrap();
    // Where the ConfigMap's volume is mounted in the Stitch container.
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == config_map["metadata"]["name"])
        .expect("a volume of the ConfigMap");
    let mount = stitch["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the ConfigMap is mounted in the Stitch container");
    let mounted_config = format!("{}/{key}", mount["mountPath"].as_str().unwrap());

    // What Kubernetes runs: `command` replaces the image's ENTRYPOINT (and drops its CMD),
    // `args` replaces CMD and is appended to the ENTRYPOINT.
    let entrypoint = exec_form(&containerfile, "ENTRYPOINT").expect("an exec-form ENTRYPOINT");
    let cmd = exec_form(&containerfile, "CMD").unwrap_or_default();
    let (command, args) = match strings(&stitch["command"]) {
        Some(command) => (command, strings(&stitch["args"]).unwrap_or_default()),
        None => (entrypoint, strings(&stitch["args"]).unwrap_or(cmd)),
    };
    let argv: Vec<String> = command.into_iter().chain(args).collect();
    assert!(
        containerfile
            .lines()
            .any(|l| l.starts_with("COPY --from=") && l.ends_with(&format!(" {}", argv[0]))),
        "the image puts the binary at {}",
        argv[0]
    );
    let configs: Vec<&String> = argv
        .windows(2)
        .filter(|w| w[0] == "--config")
        .map(|w| &w[1])
        .collect();
    assert_eq!(
        configs,
        [&mounted_config],
        "one --config, the ConfigMap's: {argv:?}"
    );
    // The same command line, with the ConfigMap's text where it is mounted, passes `check`.
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/kubernetes.yaml");
    let args: Vec<String> = argv[1..]
        .iter()
        .map(|a| {
            if *a == mounted_config {
                local.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let output = stitch_check(&args, &[]);
    assert!(
        output.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_image_runs_as_a_user_of_its_own_with_the_kubernetes_config() {
    let containerfile = read("conf/deploy/Containerfile");
    let lines: Vec<&str> = containerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(lines.contains(&"COPY conf/kubernetes.yaml /etc/stitch/stitch.yaml"));
    let user = lines.iter().rev().find(|l| l.starts_with("USER ")).unwrap();
    assert!(!user.contains(" 0") && !user.contains("root"), "{user}");
    assert!(lines.contains(&"VOLUME /var/lib/stitch"));
    let entrypoint = lines.iter().find(|l| l.starts_with("ENTRYPOINT")).unwrap();
    assert!(entrypoint.contains(r#""--config", "/etc/stitch/stitch.yaml""#));
    // The build stage installs cmake, which Pingora's zlib-ng needs.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("install") && l.contains("cmake"))
            || containerfile.contains("--no-install-recommends cmake")
    );
    let ignored = read(".dockerignore");
    assert!(ignored.lines().any(|l| l == "target"));
    assert!(ignored.lines().any(|l| l.ends_with("node_modules")));
    // The image's volume and ports are those of the config it starts with.
    let config: Value = serde_yaml::from_str(&read("conf/kubernetes.yaml")).unwrap();
    assert!(
        lines.contains(&format!("VOLUME {}", config["storage"]["dir"].as_str().unwrap()).as_str())
    );
    let exposed = lines.iter().find(|l| l.starts_with("EXPOSE ")).unwrap();
    let exposed: Vec<u64> = exposed[7..]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(
        exposed,
        [port(&config["listen"]), port(&config["metrics"]["listen"])]
    );
}

#[test]
fn the_systemd_unit_checks_before_it_upgrades_and_uses_the_config_s_paths() {
    let unit = read("conf/deploy/stitch.service");
    let config: Value = serde_yaml::from_str(&read("conf/systemd.yaml")).unwrap();
    let setting = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(setting("Type"), ["forking"]);
    assert_eq!(
        setting("PIDFile"),
        [config["process"]["pid_file"].as_str().unwrap()]
    );
    let runtime = format!("/run/{}/", setting("RuntimeDirectory")[0]);
    let state = format!("/var/lib/{}", setting("StateDirectory")[0]);
    assert!(config["process"]["pid_file"]
        .as_str()
        .unwrap()
        .starts_with(&runtime));
    assert!(config["process"]["upgrade_socket"]
        .as_str()
        .unwrap()
        .starts_with(&runtime));
    assert_eq!(config["storage"]["dir"].as_str().unwrap(), state);
    let reload = setting("ExecReload");
    assert_eq!(reload.len(), 3, "{reload:?}");
    assert!(reload[0].ends_with(" check"), "the config is checked first");
    assert!(reload[1].contains("kill -QUIT $MAINPID"));
    assert!(reload[2].contains("--daemon --upgrade"));
    assert!(setting("ExecStart")[0].contains("--daemon"));
    assert!(setting("ExecStartPre")[0].ends_with(" check"));
    for line in setting("ExecStart")
        .iter()
        .chain(&setting("ExecStartPre"))
        .chain([&reload[0], &reload[2]])
    {
        assert!(line.contains("--config /etc/stitch/stitch.yaml"), "{line}");
    }
    let stop: u64 = setting("TimeoutStopSec")[0].parse().unwrap();
    let grace: u64 = config["shutdown_grace"]
        .as_str()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(stop > grace, "systemd waits longer than Stitch drains");
    let writable = setting("ReadWritePaths").join(" ");
    assert!(writable.contains(&state) && writable.contains(runtime.trim_end_matches('/')));
}

#[test]
fn the_listing_token_the_systemd_config_offers_comes_from_the_unit_s_environment_file() {
    let unit = read("conf/deploy/stitch.service");
    let file = unit
        .lines()
        .find_map(|l| l.strip_prefix("EnvironmentFile="))
        .expect("the unit reads an environment file");
    assert!(
        file.starts_with('-'),
        "optional: the unit starts without it"
    );
    let text = read("conf/systemd.yaml");
    let commented = text
        .lines()
        .find(|l| l.trim_start().starts_with("# token_env:"))
        .expect("conf/systemd.yaml offers metrics.token_env");
    let variable = commented
        .split_whitespace()
        .nth(2)
        .expect("the variable's name");
    assert!(
        unit.contains(&format!("{variable}=")),
        "the unit names {variable}"
    );
    // Uncommented, the line is valid where the variable is set, and refused where it is not.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stitch.yaml");
    std::fs::write(&path, text.replacen("# token_env:", "token_env:", 1)).unwrap();
    let args = ["--config".to_string(), path.display().to_string()];
    let set = stitch_check(
        &args,
        &[(variable, Some("a-token-from-the-environment-file"))],
    );
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let unset = stitch_check(&args, &[(variable, None)]);
    assert!(!unset.status.success());
    assert!(String::from_utf8_lossy(&unset.stderr).contains(variable));
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_one_stitch_exposes() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("conf/deploy/grafana-dashboard.json")).unwrap();
    let metrics = free_addr();
    let h = Harness::with_routes(&format!("metrics:\n  listen: {metrics}\n{ROUTES}")).await;
    let file = ChunkedFile::resumable("dashboard.bin", random_bytes(2000, 150), 1000);
    assert_eq!(file.upload_all(&h).await.status(), 200);
    let exposition = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exposed: std::collections::HashSet<&str> = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let name = regex::Regex::new(r"\b(stitch_[a-z_]+|process_[a-z_]+)\b").unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8, "the dashboard has its panels");
    let mut queried = 0;
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for found in name.find_iter(expr) {
                queried += 1;
                assert!(
                    exposed.contains(found.as_str()),
                    "panel {:?} queries {}, which Stitch does not expose",
                    panel["title"],
                    found.as_str()
                );
            }
        }
    }
    assert!(queried >= 10);
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"].as_str() {
            for found in name.find_iter(query) {
                assert!(exposed.contains(found.as_str()), "{query}");
            }
        }
    }
}
