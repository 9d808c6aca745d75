//! Every fixed name and default of the product, in one place (SPEC §1–§6).

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "registry-addon";

/// Default topology variable holding `addons.registry`.
pub const DEFAULT_VARIABLE_NAME: &str = "clusterConfig";
/// Namespace of the extension when neither `--namespace` nor `$POD_NAMESPACE` says otherwise.
pub const DEFAULT_NAMESPACE: &str = "registry-addon-system";

/// Root CA Secret in the extension's namespace (`ca.crt`, `tls.crt`, `tls.key`).
pub const ROOT_CA_SECRET: &str = "registry-addon-root-ca";
/// Suffix of the per-cluster CA copy in the Cluster's namespace: `<cluster>-registry-addon-ca`.
pub const CLUSTER_CA_SECRET_SUFFIX: &str = "-registry-addon-ca";
/// Suffix of CAPI's kubeconfig Secret: `<cluster>-kubeconfig`, key `value`.
pub const KUBECONFIG_SECRET_SUFFIX: &str = "-kubeconfig";
pub const KUBECONFIG_SECRET_KEY: &str = "value";

/// Namespace of the registry on the workload cluster.
pub const REGISTRY_NAMESPACE: &str = "registry-system";
/// TLS Secret of the registry on the workload cluster.
pub const REGISTRY_TLS_SECRET: &str = "registry-tls";
/// StatefulSet and ClusterIP Service name.
pub const REGISTRY_NAME: &str = "registry";
/// Direct mode's Deployment of the front (and its PodDisruptionBudget).
pub const REGISTRY_DIRECT_NAME: &str = "registry-direct";
/// Workload Secret with the upstream's credentials and CA (Proxy and Direct), copied from the
/// Secrets the variable names on the management cluster.
pub const REGISTRY_UPSTREAM_SECRET: &str = "registry-upstream";
/// Where the pods mount `registry-upstream`.
pub const REGISTRY_UPSTREAM_DIR: &str = "/etc/registry-upstream";
/// ConfigMap listing, during a switch to Local, the images in use the local store must hold
/// (key [`IMAGES_IN_USE_KEY`]); Local's fronts are ready only once their registry holds them.
pub const IMAGES_IN_USE_CONFIGMAP: &str = "registry-images-in-use";
pub const IMAGES_IN_USE_KEY: &str = "images";
/// Where Local's front mounts [`IMAGES_IN_USE_CONFIGMAP`].
pub const IMAGES_IN_USE_DIR: &str = "/etc/registry-addon/images-in-use";
/// Key of `registry-upstream` holding `{"username":…,"password":…}` for Direct's front.
/// Headless Service giving each replica a stable DNS name.
pub const REGISTRY_HEADLESS_SERVICE: &str = "registry-headless";
/// Port the registry container listens on (headless Service too).
pub const REGISTRY_PORT: u16 = 5000;
/// Port of the ClusterIP Service on the fixed IP.
pub const REGISTRY_SERVICE_PORT: u16 = 443;

/// Label CAPI puts on objects of a cluster; HelmChartProxy selects on it.
pub const CLUSTER_NAME_LABEL: &str = "cluster.x-k8s.io/cluster-name";

/// Default registry image (CNCF Distribution).
pub const DEFAULT_REGISTRY_IMAGE: &str = "registry:2.8.3";

/// Runtime SDK API group/version of every request and response.
pub const HOOKS_API_VERSION: &str = "hooks.runtime.cluster.x-k8s.io/v1alpha1";
/// Path prefix of discovery and handlers.
pub const HOOKS_PATH_PREFIX: &str = "/hooks.runtime.cluster.x-k8s.io/v1alpha1/";

/// Defaults of the `addons.registry` variable (SPEC §3).
pub const DEFAULT_REPLICAS: u8 = 2;
pub const MAX_REPLICAS: u8 = 7;
pub const DEFAULT_STORAGE_SIZE: &str = "100Gi";
pub const DEFAULT_SYNC_INTERVAL: &str = "2m";
/// The registry's Service IP is this many addresses after the service CIDR's network address.
pub const SERVICE_IP_OFFSET: u128 = 20;

/// Server certificate lifetime (SPEC §5) and how far it is backdated.
pub const SERVER_CERT_DAYS: i64 = 730;
pub const CERT_BACKDATE_MINUTES: i64 = 5;
/// Root CA lifetime.
pub const ROOT_CA_DAYS: i64 = 3650;

/// Label on every object the addon writes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// apiVersion of the Cluster in ownerReferences when the request does not carry one.
pub const DEFAULT_CLUSTER_API_VERSION: &str = "cluster.x-k8s.io/v1beta2";
/// HelmChartProxy of the Cluster API Add-on Provider for Helm.
pub const HELM_CHART_PROXY_API_VERSION: &str = "addons.cluster.x-k8s.io/v1alpha1";

/// Largest request body the webhook reads.
pub const MAX_REQUEST_BYTES: usize = 10 * 1024 * 1024;

pub fn cluster_ca_secret(cluster: &str) -> String {
    format!("{cluster}{CLUSTER_CA_SECRET_SUFFIX}")
}

pub fn kubeconfig_secret(cluster: &str) -> String {
    format!("{cluster}{KUBECONFIG_SECRET_SUFFIX}")
}

/// Pod-template annotation carrying the server certificate's hash, so a renewal rolls the pods.
pub const CERTIFICATE_HASH_ANNOTATION: &str = "registry-addon/certificate-hash";
/// Pod annotation (Proxy): hash of the upstream Secret the registry reads at start.
pub const UPSTREAM_HASH_ANNOTATION: &str = "registry-addon/upstream-hash";
/// Port of the sync sidecar's Prometheus metrics.
pub const SYNC_METRICS_PORT: u16 = 9441;
/// Taint and label of control-plane nodes.
pub const CONTROL_PLANE_NODE_ROLE: &str = "node-role.kubernetes.io/control-plane";

/// containerd's hosts directory on every node.
pub const CONTAINERD_CERTS_DIR: &str = "/etc/containerd/certs.d";
/// containerd's main configuration file.
pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// Directory of the addon's containerd fragments (one per containerd major) and script.
pub const CONTAINERD_ADDON_DIR: &str = "/etc/containerd/registry-addon";
/// Where the script puts the fragment matching the node's containerd, and imports it from.
pub const CONTAINERD_DROP_IN: &str = "/etc/containerd/conf.d/registry-addon.toml";

/// The cluster's HelmChartProxy: `<cluster>-registry`, in the Cluster's namespace.
pub fn helm_chart_proxy(cluster: &str) -> String {
    format!("{cluster}-{REGISTRY_NAME}")
}

/// Registry users (SPEC §9.1): `ro` pulls, `rw` pulls and pushes. Their credentials live on the
/// management cluster in `<cluster>-registry-addon-ro` and `<cluster>-registry-addon-rw`
/// (type `kubernetes.io/basic-auth`).
pub const READ_ONLY_USER: &str = "ro";
pub const READ_WRITE_USER: &str = "rw";
/// The replica syncer's identity; it pushes to the peers. Only the workload cluster knows it.
pub const SYNC_USER: &str = "sync";

pub fn user_secret(cluster: &str, user: &str) -> String {
    format!("{cluster}-registry-addon-{user}")
}

/// Management Secret holding the node's containerd `hosts.toml` for the `_default` mirror, with
/// the `ro` credentials in it; bootstrap templates read it with `contentFrom`.
pub fn containerd_hosts_secret(cluster: &str) -> String {
    format!("{cluster}-registry-addon-containerd")
}
/// Key of [`containerd_hosts_secret`] holding the file.
pub const CONTAINERD_HOSTS_SECRET_KEY: &str = "hosts.toml";

/// Workload Secret `registry-system/registry-auth`: what the registry pods need to
/// authenticate, and nothing more (bcrypt hashes, the sync identity, the shared HTTP secret).
pub const REGISTRY_AUTH_SECRET: &str = "registry-auth";
/// htpasswd (bcrypt) of the users that may only pull.
pub const AUTH_PULL_USERS_KEY: &str = "pull.htpasswd";
/// htpasswd (bcrypt) of the users that may pull and push.
pub const AUTH_PUSH_USERS_KEY: &str = "push.htpasswd";
/// `sync:<password>`, the sync sidecar's credentials file.
pub const AUTH_SYNC_CREDENTIALS_KEY: &str = "sync.credentials";
/// Distribution's `http.secret`, the same on every replica behind the Service.
pub const AUTH_HTTP_SECRET_KEY: &str = "http.secret";
/// Bearer token the registry sends with its push notifications and the sync sidecar checks.
pub const AUTH_NOTIFY_TOKEN_KEY: &str = "notify.token";
/// Annotation on `registry-auth` naming what its hashes were made from (the management user
/// Secrets' uid and resourceVersion, and a digest of the hash files), so a repeated call can
/// tell the hashes are current without running bcrypt.
pub const AUTH_SOURCE_ANNOTATION: &str = "registry-addon/users-source";

/// Where the registry listens inside its pod, behind the front (plain HTTP, loopback only).
pub const REGISTRY_LOOPBACK_PORT: u16 = 5001;
/// Where the front's relay to the upstream listens inside a Proxy pod (plain HTTP, loopback
/// only): the registry's `proxy.remoteurl`.
pub const PROXY_RELAY_PORT: u16 = 5003;
/// Port of the front's probes and metrics (plain HTTP).
pub const FRONT_METRICS_PORT: u16 = 9442;

/// The node agent (`registry-addon node-agent`): its DaemonSet, ServiceAccount, Role and
/// ClusterRole on the workload cluster, in [`REGISTRY_NAMESPACE`].
pub const NODE_AGENT_NAME: &str = "registry-node-agent";
/// Workload Secret in [`REGISTRY_NAMESPACE`] holding the desired node configuration, written
/// by the controller and read by the node agent.
pub const NODE_CONFIG_SECRET: &str = "registry-node-config";
/// Keys of [`NODE_CONFIG_SECRET`]: the `_default` hosts file, the CA bundle written beside
/// every mirror host's directory, the content hash and the rollout phase.
pub const NODE_CONFIG_HOSTS_KEY: &str = "hosts.toml";
pub const NODE_CONFIG_CA_KEY: &str = "ca.crt";
pub const NODE_CONFIG_HASH_KEY: &str = "hash";
pub const NODE_CONFIG_PHASE_KEY: &str = "phase";
/// Node annotation: the hash of the node configuration the agent applied last.
pub const NODE_CONFIG_ANNOTATION: &str = "registry-addon.io/node-config";
/// Node condition: the node reaches the mirror with the files on disk.
pub const MIRROR_READY_CONDITION: &str = "RegistryMirrorReady";
/// Node condition: the desired node configuration is applied (False when it is refused).
pub const NODE_CONFIG_CONDITION: &str = "RegistryNodeConfigApplied";
/// Manifest of the files the agent wrote, inside the hosts directory.
pub const NODE_AGENT_MANIFEST: &str = ".registry-addon-owned";
/// The last applied config, inside the hosts directory (root only: it holds the `ro` header),
/// so that a restarted agent repairs the files before it reaches the API server.
pub const NODE_AGENT_APPLIED: &str = ".registry-addon-applied";
/// Port of the node agent's metrics and probes (host network: clear of the kubelet's and
/// node-exporter's ports and of the extension's own 9440-9443).
pub const NODE_AGENT_METRICS_PORT: u16 = 9445;
