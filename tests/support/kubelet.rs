//! A stand-in for what runs the registry's workloads on a real cluster: the StatefulSet and
//! Deployment controllers, the kubelet and kube-proxy, over the in-memory API server.
//!
//! [`Kubelet::sync`] reads StatefulSet `registry` and Deployment `registry-direct` in
//! `registry-system` and runs their pods as the real programs: each pod's `registry` container
//! is `docker-registry`, its `front` container the addon's binary, with the container's own
//! arguments and environment. Volumes become directories holding the Secrets' and ConfigMaps'
//! keys as they are when the pod starts, an `emptyDir`, or for a volume claim template one directory per
//! claim (`data-registry-0`) that outlives the pod and the StatefulSet, as the PVC does. Ports
//! a container listens on (`0.0.0.0:N`, `127.0.0.1:N`) are mapped to free loopback ports,
//! one map per pod, since all pods share this machine's loopback.
//!
//! Pods are Ready when the front's `/readyz` answers 200; the workloads' status counts them.
//! The Service `registry` is haproxy in TCP mode on the Service's ClusterIP (a loopback
//! address in the tests) and port 443, its backends the Ready pods its selector matches,
//! changed through haproxy's runtime API: existing connections stay on a pod taken out, as
//! with kube-proxy.
//!
//! A Deployment's new pods start before the old ones stop (maxSurge); a StatefulSet's pod is
//! stopped before its replacement starts (RollingUpdate, one ordinal at a time). The sync
//! sidecar is not run: the tests run one replica, which has no peer to sync with.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::apiserver::ApiServer;

const NS: &str = "registry-system";
/// Backend slots of the balancer: more than any test runs at once.
const SLOTS: usize = 16;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn workloads() -> [(&'static str, String); 2] {
    [
        (
            "StatefulSet",
            format!("/apis/apps/v1/namespaces/{NS}/statefulsets/registry"),
        ),
        (
            "Deployment",
            format!("/apis/apps/v1/namespaces/{NS}/deployments/registry-direct"),
        ),
    ]
}

/// One running pod.
struct Pod {
    /// `StatefulSet/registry`, `Deployment/registry-direct`.
    owner: String,
    /// SHA-256 of the pod template it was started from.
    template: String,
    ordinal: usize,
    name: String,
    labels: serde_json::Map<String, Value>,
    children: Vec<(String, Child)>,
    front_port: u16,
    metrics_port: u16,
    ready: bool,
    dir: PathBuf,
}

impl Pod {
    /// SIGTERM to every container, as the kubelet does, then SIGKILL after the grace period.
    fn stop(mut self) {
        for (_, child) in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (_, child) in &mut self.children {
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn exited(&mut self) -> Option<String> {
        self.children.iter_mut().find_map(|(name, child)| {
            child
                .try_wait()
                .ok()
                .flatten()
                .map(|status| format!("{name}: {status}"))
        })
    }

    fn probe(&mut self) {
        self.ready = http_status(self.metrics_port, "/readyz") == Some(200);
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.children {
            let log =
                std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            out.push_str(&format!("--- {} {name}\n{log}", self.name));
        }
        out
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.split_whitespace().nth(1)?.parse().ok()
}

/// haproxy standing in for kube-proxy: the Service's ClusterIP:443 over the Ready pods.
struct Balancer {
    child: Child,
    socket: PathBuf,
    backends: Vec<u16>,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Balancer {
    fn start(dir: &Path, address: &str) -> Balancer {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("admin.sock");
        let config = format!(
            // noreuseport: a second balancer on the same address fails instead of sharing it.
            "global\n  maxconn 1024\n  noreuseport\n  stats socket {} mode 600 level admin\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 120s\n  timeout server 120s\n\
             frontend registry\n  bind {address}:443\n  default_backend pods\n\
             backend pods\n  balance roundrobin\n  server-template s 1-{SLOTS} 127.0.0.1:1 disabled\n",
            socket.display()
        );
        std::fs::write(dir.join("haproxy.cfg"), config).unwrap();
        let log = std::fs::File::create(dir.join("haproxy.log")).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(dir.join("haproxy.cfg"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("haproxy must be installed (Debian package haproxy)");
        let mut balancer = Balancer {
            child,
            socket,
            backends: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while balancer.command("show info").is_none() {
            assert!(
                balancer.child.try_wait().unwrap().is_none() && Instant::now() < deadline,
                "haproxy did not start on {address}:443: {}",
                std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        balancer
    }

    fn command(&self, command: &str) -> Option<String> {
        let mut stream = UnixStream::connect(&self.socket).ok()?;
        writeln!(stream, "{command}").ok()?;
        let mut out = String::new();
        stream.read_to_string(&mut out).ok()?;
        Some(out)
    }

    /// Sets the backends to `ports`, in the order given; slots beyond go to maintenance (their
    /// connections stay).
    fn set(&mut self, ports: &[u16]) {
        if ports == self.backends.as_slice() {
            return;
        }
        assert!(ports.len() <= SLOTS, "more pods than balancer slots");
        for slot in 0..SLOTS {
            let server = format!("pods/s{}", slot + 1);
            match ports.get(slot) {
                Some(port) if self.backends.get(slot) != Some(port) => {
                    self.command(&format!("set server {server} state maint"));
                    self.command(&format!("set server {server} addr 127.0.0.1 port {port}"));
                    self.command(&format!("set server {server} state ready"));
                }
                Some(_) => {}
                None if slot < self.backends.len() => {
                    self.command(&format!("set server {server} state maint"));
                }
                None => {}
            }
        }
        self.backends = ports.to_vec();
    }
}

/// The StatefulSet and Deployment controllers, the kubelet and kube-proxy, for the registry.
pub struct Kubelet {
    dir: PathBuf,
    binary: PathBuf,
    pods: Vec<Pod>,
    balancer: Option<Balancer>,
    started: usize,
}

impl Kubelet {
    /// `binary` is the addon's (`env!("CARGO_BIN_EXE_registry-addon")`).
    pub fn new(dir: &Path, binary: &str) -> Kubelet {
        std::fs::create_dir_all(dir).unwrap();
        Kubelet {
            dir: dir.to_path_buf(),
            binary: binary.into(),
            pods: Vec::new(),
            balancer: None,
            started: 0,
        }
    }

    /// One pass: pods started and stopped to match the workloads, readiness probed, the
    /// workloads' status written when it changes, and the Service's backends set.
    pub fn sync(&mut self, api: &ApiServer) {
        // Crashed pods (a port taken meanwhile, say) are replaced.
        let mut i = 0;
        while i < self.pods.len() {
            if let Some(exit) = self.pods[i].exited() {
                let pod = self.pods.remove(i);
                eprintln!(
                    "pod {} exited ({exit}); replacing it:\n{}",
                    pod.name,
                    pod.logs()
                );
                pod.stop();
            } else {
                i += 1;
            }
        }
        for pod in &mut self.pods {
            pod.probe();
        }
        for (kind, path) in workloads() {
            let workload = api.get(&path);
            let owner = format!("{kind}/{}", path.rsplit('/').next().unwrap());
            let Some(workload) = workload.filter(|w| w["metadata"]["deletionTimestamp"].is_null())
            else {
                self.stop_where(|p| p.owner == owner);
                continue;
            };
            let replicas = workload["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
            let template = &workload["spec"]["template"];
            let hash = hex::encode(Sha256::digest(template.to_string()));
            self.stop_where(|p| p.owner == owner && p.ordinal >= replicas);
            for ordinal in 0..replicas {
                let current = |p: &Pod| p.owner == owner && p.ordinal == ordinal;
                if self.pods.iter().any(|p| current(p) && p.template == hash) {
                    // Up to date; an old pod of this ordinal goes once it is Ready (surge).
                    let new_ready = self
                        .pods
                        .iter()
                        .any(|p| current(p) && p.template == hash && p.ready);
                    if new_ready {
                        self.stop_where(|p| current(p) && p.template != hash);
                    }
                    continue;
                }
                if kind == "StatefulSet" {
                    self.stop_where(current);
                }
                let pod = self.start_pod(api, &owner, &workload, &hash, ordinal);
                self.pods.push(pod);
            }
            let ours: Vec<&Pod> = self
                .pods
                .iter()
                .filter(|p| p.owner == owner && p.template == hash)
                .collect();
            let ready = ours.iter().filter(|p| p.ready).count() as u64;
            let status = json!({
                "observedGeneration": workload["metadata"]["generation"],
                "replicas": replicas,
                "readyReplicas": ready,
                "availableReplicas": ready,
                "updatedReplicas": ours.len(),
            });
            if workload["status"] != status {
                api.update(&path, |w| w["status"] = status.clone());
            }
        }
        self.route(api);
    }

    /// Pods started so far, restarts included.
    pub fn started(&self) -> usize {
        self.started
    }

    /// The loopback port of a running pod's front (what `kubectl port-forward` would reach).
    pub fn front_port(&self, pod: &str) -> Option<u16> {
        self.pods
            .iter()
            .find(|p| p.name == pod)
            .map(|p| p.front_port)
    }

    /// Names of the running pods.
    pub fn pod_names(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.name.clone()).collect()
    }

    pub fn logs(&self) -> String {
        self.pods.iter().map(Pod::logs).collect()
    }

    fn stop_where(&mut self, remove: impl Fn(&Pod) -> bool) {
        let (gone, kept): (Vec<Pod>, Vec<Pod>) = std::mem::take(&mut self.pods)
            .into_iter()
            .partition(|p| remove(p));
        self.pods = kept;
        if gone.is_empty() {
            return;
        }
        // Endpoints first, then the pods: new connections no longer reach them.
        let ports: Vec<u16> = self
            .balancer
            .as_ref()
            .map(|b| b.backends.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|port| !gone.iter().any(|p| p.front_port == *port))
            .collect();
        if let Some(balancer) = &mut self.balancer {
            balancer.set(&ports);
        }
        for pod in gone {
            pod.stop();
        }
    }

    /// The Service's backends: its selector over the Ready pods; none without the Service.
    fn route(&mut self, api: &ApiServer) {
        let Some(service) = api.get(&format!("/api/v1/namespaces/{NS}/services/registry")) else {
            if let Some(balancer) = &mut self.balancer {
                balancer.set(&[]);
            }
            return;
        };
        let address = service["spec"]["clusterIP"]
            .as_str()
            .expect("the Service has a ClusterIP")
            .to_string();
        let selector = service["spec"]["selector"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let ports: Vec<u16> = self
            .pods
            .iter()
            .filter(|p| p.ready && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .map(|p| p.front_port)
            .collect();
        let dir = self.dir.join("balancer");
        let balancer = self
            .balancer
            .get_or_insert_with(|| Balancer::start(&dir, &address));
        balancer.set(&ports);
    }

    fn start_pod(
        &mut self,
        api: &ApiServer,
        owner: &str,
        workload: &Value,
        hash: &str,
        ordinal: usize,
    ) -> Pod {
        self.started += 1;
        let workload_name = workload["metadata"]["name"].as_str().unwrap();
        let name = if owner.starts_with("StatefulSet/") {
            format!("{workload_name}-{ordinal}")
        } else {
            format!("{workload_name}-{}-{ordinal}", &hash[..8])
        };
        let dir = self.dir.join(format!("pod-{}-{name}", self.started));
        std::fs::create_dir_all(&dir).unwrap();
        let template = &workload["spec"]["template"];
        let spec = &template["spec"];
        let claims: Vec<String> = workload["spec"]["volumeClaimTemplates"]
            .as_array()
            .map(|c| {
                c.iter()
                    .map(|t| t["metadata"]["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        // Volumes, as the kubelet projects them.
        let mut volumes: BTreeMap<String, PathBuf> = BTreeMap::new();
        for volume in spec["volumes"].as_array().into_iter().flatten() {
            let volume_name = volume["name"].as_str().unwrap().to_string();
            let path = dir.join("volumes").join(&volume_name);
            std::fs::create_dir_all(&path).unwrap();
            if let Some(secret) = volume["secret"].as_object() {
                let secret_name = secret["secretName"].as_str().unwrap();
                let data = secret_data(api, secret_name);
                match secret.get("items").and_then(Value::as_array) {
                    Some(items) => {
                        for item in items {
                            let key = item["key"].as_str().unwrap();
                            let content = data.get(key).unwrap_or_else(|| {
                                panic!("pod {name}: Secret {secret_name} has no key {key}")
                            });
                            std::fs::write(path.join(item["path"].as_str().unwrap()), content)
                                .unwrap();
                        }
                    }
                    None => {
                        for (key, content) in &data {
                            std::fs::write(path.join(key), content).unwrap();
                        }
                    }
                }
            } else if let Some(configmap) = volume["configMap"].as_object() {
                let configmap_name = configmap["name"].as_str().unwrap();
                let path_of = format!("/api/v1/namespaces/{NS}/configmaps/{configmap_name}");
                match api.get(&path_of) {
                    Some(object) => {
                        for (key, value) in object["data"].as_object().into_iter().flatten() {
                            std::fs::write(path.join(key), value.as_str().unwrap()).unwrap();
                        }
                    }
                    None if configmap.get("optional") == Some(&json!(true)) => {}
                    None => {
                        panic!("pod {name} mounts ConfigMap {configmap_name}, which does not exist")
                    }
                }
            } else if volume.get("emptyDir").is_none() {
                panic!("pod {name}: volume {volume_name} of a kind the stand-in does not project");
            }
            volumes.insert(volume_name, path);
        }
        for claim in claims {
            // The PVC: one per claim and ordinal, outliving pods and the StatefulSet.
            let path = self
                .dir
                .join("pvcs")
                .join(format!("{claim}-{workload_name}-{ordinal}"));
            std::fs::create_dir_all(&path).unwrap();
            volumes.insert(claim, path);
        }
        // The pod's own ports: those its containers declare, and the loopback ones between its
        // containers. Only these are moved; any other address (an upstream's) is left as is.
        let mut ports: BTreeMap<u16, u16> = BTreeMap::new();
        let mut own_ports = vec![
            registry_addon::names::REGISTRY_LOOPBACK_PORT,
            registry_addon::names::PROXY_RELAY_PORT,
        ];
        if let Some((_, port)) = registry_addon::render::registry::SYNC_NOTIFY_ADDR.rsplit_once(':')
        {
            own_ports.extend(port.parse::<u16>().ok());
        }
        for container in spec["containers"].as_array().into_iter().flatten() {
            for port in container["ports"].as_array().into_iter().flatten() {
                own_ports.extend(port["containerPort"].as_u64().map(|p| p as u16));
            }
        }
        for port in own_ports {
            ports.entry(port).or_insert_with(free_port);
        }
        let mut children = Vec::new();
        for container in spec["containers"].as_array().unwrap() {
            let container_name = container["name"].as_str().unwrap().to_string();
            let mut mounts: Vec<(String, PathBuf)> = container["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    let mut path = volumes[m["name"].as_str().unwrap()].clone();
                    if let Some(sub) = m["subPath"].as_str() {
                        path = path.join(sub);
                        std::fs::create_dir_all(&path).unwrap();
                    }
                    (m["mountPath"].as_str().unwrap().to_string(), path)
                })
                .collect();
            mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
            let map = |value: &str| rewrite(value, &mounts, &ports);
            let mut env: Vec<(String, String)> = Vec::new();
            for var in container["env"].as_array().into_iter().flatten() {
                let key = var["name"].as_str().unwrap().to_string();
                let value = if let Some(value) = var["value"].as_str() {
                    map(value)
                } else if let Some(secret) = var["valueFrom"]["secretKeyRef"].as_object() {
                    let data = secret_data(api, secret["name"].as_str().unwrap());
                    let content = &data[secret["key"].as_str().unwrap()];
                    String::from_utf8(content.clone()).unwrap()
                } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
                    name.clone()
                } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace" {
                    NS.to_string()
                } else {
                    panic!("pod {name}: env {key} of a kind the stand-in does not resolve")
                };
                env.push((key, value));
            }
            let args: Vec<String> = container["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| map(a.as_str().unwrap()))
                .collect();
            let mut command = match container_name.as_str() {
                "registry" => {
                    // The Distribution image's own configuration, which the env overrides.
                    let config = dir.join("registry-config.yml");
                    std::fs::write(
                        &config,
                        "version: 0.1\nlog:\n  fields:\n    service: registry\nstorage:\n  \
                         filesystem:\n    rootdirectory: /var/lib/registry\nhttp:\n  addr: :5000\n",
                    )
                    .unwrap();
                    let mut command = Command::new("/usr/bin/docker-registry");
                    command.arg("serve").arg(config);
                    command
                }
                "front" => {
                    let mut command = Command::new(&self.binary);
                    command.args(&args);
                    command
                }
                // One replica: no peer to sync with.
                "sync" => continue,
                other => panic!("pod {name}: container {other} the stand-in does not run"),
            };
            let log = std::fs::File::create(dir.join(format!("{container_name}.log"))).unwrap();
            let child = command
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .envs(env)
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("pod {name}: starting {container_name}: {e}"));
            children.push((container_name.clone(), child));
            // As the kubelet: the next container starts once this one's postStart hook
            // returned; a failed hook kills the container (here: the pod is replaced).
            let hook = &container["lifecycle"]["postStart"]["exec"]["command"];
            if let Some(command) = hook.as_array() {
                let words: Vec<String> = command.iter().map(|w| map(w.as_str().unwrap())).collect();
                assert_eq!(
                    words[0],
                    registry_addon::render::registry::IMAGE_BINARY,
                    "pod {name}: a postStart hook the stand-in does not run"
                );
                let status = Command::new(&self.binary)
                    .args(&words[1..])
                    .stdin(Stdio::null())
                    .status()
                    .unwrap();
                if !status.success() {
                    eprintln!("pod {name}: the postStart hook of {container_name} failed");
                    if let Some((_, child)) = children.last_mut() {
                        let _ = child.kill();
                    }
                }
            }
        }
        let front_port = ports[&registry_addon::names::REGISTRY_PORT];
        let metrics_port = ports[&registry_addon::names::FRONT_METRICS_PORT];
        Pod {
            owner: owner.to_string(),
            template: hash.to_string(),
            ordinal,
            name,
            labels: template["metadata"]["labels"]
                .as_object()
                .cloned()
                .unwrap_or_default(),
            children,
            front_port,
            metrics_port,
            ready: false,
            dir,
        }
    }
}

/// A Secret's keys in `registry-system`, decoded; panics naming it when it is missing.
fn secret_data(api: &ApiServer, name: &str) -> BTreeMap<String, Vec<u8>> {
    let secret = api
        .get(&format!("/api/v1/namespaces/{NS}/secrets/{name}"))
        .unwrap_or_else(|| panic!("a pod mounts Secret {NS}/{name}, which does not exist"));
    secret["data"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap())
                .unwrap();
            (k.clone(), bytes)
        })
        .collect()
}

/// `value` with a mount path prefix replaced by its directory, and an address of one of the
/// pod's own ports (`0.0.0.0:N`, `127.0.0.1:N`; the keys of `ports`) by its loopback port here.
fn rewrite(value: &str, mounts: &[(String, PathBuf)], ports: &BTreeMap<u16, u16>) -> String {
    for (path, dir) in mounts {
        if let Some(rest) = value.strip_prefix(path.as_str()) {
            return format!("{}{rest}", dir.display());
        }
    }
    for host in ["http://127.0.0.1:", "0.0.0.0:", "127.0.0.1:"] {
        if let Some(rest) = value.strip_prefix(host) {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Some(&mapped) = digits.parse::<u16>().ok().and_then(|p| ports.get(&p)) {
                let scheme = if host.starts_with("http://") {
                    "http://"
                } else {
                    ""
                };
                return format!("{scheme}127.0.0.1:{mapped}{}", &rest[digits.len()..]);
            }
        }
    }
    value.to_string()
}
