//! Real servers for end-to-end runs: nginx on a backend host answering with its name, and a
//! small UDP responder. Each is a guard: dropping it stops the server.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::netns::{Netns, in_netns};

/// nginx in a namespace: port 80 on every address (the VIPs on loopback and the host's own,
/// which health checks use), `GET /` answers `<name>\n`, `GET /big/<n>` streams `n` KiB slowly
/// enough for a long-lived download (rate-limited), `POST /upload` accepts a body up to 64 MiB.
#[derive(Debug)]
pub struct Nginx {
    child: Option<Child>,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx (foreground, one worker) in `ns` and waits until it accepts connections.
    pub fn start(ns: &Netns, name: &str) -> Nginx {
        let dir = std::env::temp_dir().join(format!(
            "{}{}-nginx-{name}-{}",
            crate::netns::PREFIX,
            std::process::id(),
            ns.name()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
        let conf = format!(
            r#"
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_max_body_size 64m;
    server {{
        listen 80 reuseport;
        listen [::]:80 reuseport;
        location / {{
            default_type text/plain;
            return 200 "{name}\n";
        }}
        location /upload {{
            client_body_buffer_size 1m;
            proxy_pass http://127.0.0.1:81/done;
        }}
        location /big/ {{
            limit_rate 64k;
            alias {dir}/big/;
        }}
    }}
    server {{
        listen 127.0.0.1:81;
        location /done {{
            default_type text/plain;
            return 200 "{name} received\n";
        }}
    }}
}}
"#,
            dir = dir.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("writing nginx.conf");
        // A 4 MiB file for slow downloads.
        std::fs::create_dir_all(dir.join("big")).expect("big dir");
        std::fs::write(dir.join("big/file"), vec![b'x'; 4 << 20]).expect("big file");
        let child = ns
            .command("nginx")
            .args(["-c", conf_path.to_str().expect("utf-8"), "-p"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning nginx (installed by `cargo xtask setup`)");
        let nginx = Nginx {
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let up = loop {
            let ok = in_netns(ns, || {
                TcpStream::connect_timeout(
                    &SocketAddr::from(([127, 0, 0, 1], 80)),
                    Duration::from_millis(200),
                )
                .is_ok()
            });
            if ok || Instant::now() > deadline {
                break ok;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            up,
            "nginx in {} did not start; see {}",
            ns.name(),
            nginx.dir.join("logs/error.log").display()
        );
        nginx
    }

    /// Stops nginx now (its port then refuses connections).
    ///
    /// SIGTERM, not SIGKILL: the worker is a separate process that nginx does not tie to its
    /// master's life, so killing only the master (`Child::kill`) left the worker serving port 80
    /// (and leaked it past the test). On SIGTERM the master stops its worker and exits; SIGKILL
    /// is the bounded fallback.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM, nginx's fast shutdown: the master stops its worker, then exits. SIGKILL
            // would kill only the master and leave the worker serving the port, orphaned.
            // SAFETY: kill(2) on our own child's pid (`ip netns exec` execs nginx in place).
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A UDP responder in a namespace: every datagram to one of `addrs` is answered with
/// `<name> <datagram>` from that address. Bound per address rather than to the wildcard, so a
/// reply to a VIP leaves from the VIP (a wildcard socket would answer from the host's own
/// address, which a DSR client does not expect).
#[derive(Debug)]
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl UdpEcho {
    /// Starts answering on each of `addrs`.
    pub fn start(ns: &Netns, name: &str, addrs: &[SocketAddr]) -> UdpEcho {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &addr in addrs {
            let socket = in_netns(ns, move || {
                let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("timeout");
                s
            });
            let (stop, name) = (stop.clone(), name.to_string());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        let reply = [name.as_bytes(), b" ", &buf[..n]].concat();
                        let _ = socket.send_to(&reply, from);
                    }
                }
            }));
        }
        UdpEcho { stop, threads }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A keep-alive HTTP/1.1 client connection opened from a namespace: one TCP connection (one
/// flow through the balancer) carrying as many `GET`s as asked. Every read and write is
/// bounded (5 s).
#[derive(Debug)]
pub struct HttpConn {
    stream: BufReader<TcpStream>,
    host: String,
}

impl HttpConn {
    /// Connects from `ns` to `addr` (within 5 s). The socket stays in `ns` whatever thread
    /// uses it later.
    pub fn open(ns: &Netns, addr: SocketAddr) -> std::io::Result<HttpConn> {
        let stream = in_netns(ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(HttpConn {
            stream: BufReader::new(stream),
            host: addr.to_string(),
        })
    }

    /// The client's side of the connection (address and source port).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.get_ref().local_addr()
    }

    /// Sends `GET path` on this connection and returns the status code and the body. The
    /// response must carry a `Content-Length` (nginx's do); the connection stays open.
    pub fn get(&mut self, path: &str) -> std::io::Result<(u16, String)> {
        let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.stream.get_mut().write_all(request.as_bytes())?;
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("no status line"))?;
        let mut length = None;
        loop {
            line.clear();
            if self.stream.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let length = length.ok_or_else(|| invalid("no Content-Length"))?;
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Runs `curl` in `ns` and returns (exit code, stdout). `args` follow `curl -sS --max-time 5`.
pub fn curl(ns: &Netns, args: &[&str]) -> (i32, String) {
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("running curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
