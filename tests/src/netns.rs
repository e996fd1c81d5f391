//! Network namespaces for end-to-end tests. Every host is a namespace the test creates; the
//! root namespace is never a host or a hop. Guards delete what they created even when a test
//! panics, and [`sweep_stale`] removes leftovers of runs that were killed.

use std::{
    ffi::CString,
    fs::File,
    net::SocketAddr,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

/// Prefix of every namespace the tests create: `xlbt-<pid>-<n>-<tag>`.
pub const PREFIX: &str = "xlbt-";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted (with every interface in it) when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace with loopback up. `tag` names its role (client, lb, ...).
    pub fn create(tag: &str) -> Netns {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{tag}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `args` inside the namespace and returns its output, whatever the exit status.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args[0]);
        cmd.args(&args[1..]);
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in {}: {e}", self.name))
    }

    /// Runs `args` inside the namespace; panics with its output if it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed ({}):\nstdout: {}\nstderr: {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sends one raw Ethernet frame out of `interface` (inside this namespace) through an
    /// AF_PACKET socket: how tests put malformed frames on the wire.
    pub fn send_raw_frame(&self, interface: &str, frame: &[u8]) {
        let path = format!("/var/run/netns/{}", self.name);
        let interface = interface.to_string();
        let frame = frame.to_vec();
        // setns affects only the calling thread, so a short-lived thread does the sending.
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: plain syscalls on fds we own; results are checked.
            unsafe {
                assert_eq!(
                    libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET),
                    0,
                    "setns: {}",
                    std::io::Error::last_os_error()
                );
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
                assert!(
                    fd >= 0,
                    "AF_PACKET socket: {}",
                    std::io::Error::last_os_error()
                );
                let c_if = CString::new(interface.clone()).expect("interface name");
                let ifindex = libc::if_nametoindex(c_if.as_ptr());
                assert!(ifindex != 0, "no interface {interface} in the namespace");
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_ifindex = ifindex as i32;
                addr.sll_halen = 6;
                addr.sll_addr[..6].copy_from_slice(&frame[..6]);
                let sent = libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                assert_eq!(sent, frame.len() as isize, "sendto: {err}");
            }
        })
        .join()
        .expect("raw frame sender panicked");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes every interface inside it; veth peers in other
        // namespaces go with their pair.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// Creates a veth pair with one end in each namespace (created there directly, so the root
/// namespace never holds either end), turns off TX checksum offload on both ends (a veth
/// artefact that XDP-rewritten frames would otherwise carry as bad checksums) and brings them up.
pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    run_ok(Command::new("ip").args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]));
    for (ns, ifname) in [(a, a_if), (b, b_if)] {
        ns.run(&["ethtool", "-K", ifname, "tx", "off"]);
        ns.run(&["ip", "link", "set", ifname, "up"]);
    }
}

/// The test process that created `name` (`xlbt-<pid>-...`), if it is one of ours.
pub fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Whether `name` was made by a test process that no longer exists. Anything else with the
/// prefix (a name without a pid: another user's, a person's hand-made `xlbt-brk-lb`) is not
/// ours to delete, on a machine several people share.
fn stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
}

/// Deletes namespaces left by earlier test processes that no longer exist.
pub fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if stale(name) {
            let _ = Command::new("ip").args(["netns", "delete", name]).output();
        }
    }
    // Pin and temporary directories of dead runs (their pins keep maps alive).
    for dir in [std::path::PathBuf::from(TEST_BPFFS), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                let _ = lb_userspace::pins::PinDir::new(entry.path()).remove_all();
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Per-test directories for an agent: a temporary directory (admin socket, state) and a pin
/// directory on bpffs, both named `xlbt-<pid>-<n>-<tag>` and removed when dropped (pins
/// included, which detaches a program the test left attached and frees its maps).
#[derive(Debug)]
pub struct AgentDirs {
    /// For `agent.admin_socket` and `agent.state_dir`.
    pub tmp: std::path::PathBuf,
    /// For `agent.bpffs_dir`.
    pub bpffs: std::path::PathBuf,
}

/// Where tests pin: a bpffs of the tests' own, mounted in the root mount namespace. Not below
/// /sys: `ip netns exec` gives each command a private mount namespace with a fresh /sys, so a
/// bpffs at /sys/fs/bpf mounted there would vanish (with the pins) when the agent exits.
pub const TEST_BPFFS: &str = "/run/xlbt-bpffs";

/// Mounts the tests' bpffs at [`TEST_BPFFS`] unless it is mounted already.
pub fn ensure_test_bpffs() {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(TEST_BPFFS) && l.contains(" bpf "));
    if !mounted {
        std::fs::create_dir_all(TEST_BPFFS).expect("creating the tests' bpffs mount point");
        run_ok(Command::new("mount").args(["-t", "bpf", "bpf", TEST_BPFFS]));
    }
}

impl AgentDirs {
    /// Fresh, unique directories (the pin directory is created by the agent).
    pub fn create(tag: &str) -> AgentDirs {
        ensure_test_bpffs();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{tag}", std::process::id());
        let tmp = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&tmp).expect("creating the test's temporary directory");
        AgentDirs {
            tmp,
            bpffs: std::path::Path::new(TEST_BPFFS).join(name),
        }
    }

    /// The `[agent]` keys that point the agent at these directories.
    pub fn agent_keys(&self) -> String {
        format!(
            "admin_socket = \"{}\"\nstate_dir = \"{}\"\nbpffs_dir = \"{}\"\n",
            self.tmp.join("admin.sock").display(),
            self.tmp.join("state").display(),
            self.bpffs.display()
        )
    }
}

impl Drop for AgentDirs {
    fn drop(&mut self) {
        let _ = lb_userspace::pins::PinDir::new(&self.bpffs).remove_all();
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `sockaddr` of `addr`, for bind(2), connect(2) and sendto(2).
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every sockaddr type.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Runs `f` on a thread that has entered `ns`'s network namespace (sockets it opens live
/// there), and returns its result.
pub fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
    .join()
    .expect("thread in namespace panicked")
}

/// Starts `f` on a thread inside `ns` without waiting for it.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
}

fn enter(path: &str) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on an fd we own; affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_dead_test_processes_are_stale() {
        let me = std::process::id();
        assert_eq!(owner_pid(&format!("xlbt-{me}-3-lb")), Some(me));
        assert!(
            !stale(&format!("xlbt-{me}-3-lb")),
            "a live process's namespace"
        );
        // Above the kernel's largest pid (4194304): a process that cannot exist.
        assert!(stale("xlbt-4999999-1-lb"));
        // Names that carry no pid belong to someone else: never swept (they once were, and a
        // run of the tests deleted another person's hand-made namespaces).
        for foreign in [
            "xlbt-brk-lb",
            "xlbt--lb",
            "xlbt-",
            "xlbt-bpffs",
            "other-1-lb",
        ] {
            assert_eq!(owner_pid(foreign), None, "{foreign}");
            assert!(!stale(foreign), "{foreign}");
        }
    }
}
