//! A private containerd for tests: its own root, state and socket under a test directory,
//! without the CRI plugin, stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The containerd process; killed when dropped.
pub struct Containerd(Child);

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts containerd under `dir` (keep the path short: its socket path must fit in 108
/// bytes) and waits until `ctr version` answers; returns it with its socket.
pub fn start_containerd(dir: &Path) -> (Containerd, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let socket = dir.join("containerd.sock");
    let config = format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{d}/containerd-ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
        d = dir.display(),
        sock = socket.display(),
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    let child = Command::new("containerd")
        .args(["--config", dir.join("config.toml").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("containerd must be installed (Debian package containerd), and run as root");
    let running = Containerd(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !Command::new("ctr")
        .args(["--address", socket.to_str().unwrap(), "version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(
            Instant::now() < deadline,
            "containerd did not start; log:\n{}",
            std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (running, socket)
}
