//! Pass-through cost: requests that are not uploads, through Stitch, through a bare Pingora
//! proxy (this bench re-run as a proxy with nothing but an upstream peer, in a process of its
//! own like Stitch), and through nginx (Debian's, as `.ci/setup` unpacks it), in front of the
//! same upstream, measured alternately in the same run; medians.
//! Results replace the "pass-through" section of `benches/results.md`.
//!
//! Run: `cargo bench --bench passthrough` (ROUNDS=… SECONDS=… CLIENTS=… to change the sizes).

#[path = "common/bench.rs"]
mod bench;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/report.rs"]
mod report;

use async_trait::async_trait;
use bench::{env_u64, median, rate, Stitch};
use common::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use report::Goal;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The settings this bench reads from the environment.
const KNOBS: [&str; 3] = ["ROUNDS", "SECONDS", "CLIENTS"];

/// Stitch against the bare Pingora proxy (requests/s, and CPU per request).
const BARE_AIM: f64 = 0.95;

/// The bare proxy: every request to one upstream, nothing else.
struct Bare(SocketAddr);

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.0, false, String::new())))
    }
}

/// Runs the bare proxy in this process (the bench re-run with BARE_LISTEN and BARE_UPSTREAM).
fn run_bare(listen: &str, upstream: &str) -> ! {
    let conf = pingora::server::configuration::ServerConf {
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        ..Default::default()
    };
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, Bare(upstream.parse().unwrap()));
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever()
}

/// A child process, stopped when dropped: SIGTERM, so that nginx's master stops its workers
/// too (SIGKILL would leave them running), then waited for.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn wait_listening(addr: SocketAddr, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "it exited");
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start_bare(upstream: SocketAddr) -> (Process, SocketAddr) {
    let listen = free_addr();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("BARE_LISTEN", listen.to_string())
        .env("BARE_UPSTREAM", upstream.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(listen, &mut child);
    (Process(child), listen)
}

/// nginx proxying to `upstream` with keep-alive, if it is installed or unpacked.
fn start_nginx(upstream: SocketAddr, dir: &Path) -> Option<(Process, SocketAddr)> {
    let unpacked = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/nginx/usr/sbin/nginx");
    let binary = [unpacked, "/usr/sbin/nginx".into()]
        .into_iter()
        .find(|p| p.exists())?;
    let listen = free_addr();
    let d = dir.display();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let conf = format!(
        "daemon off;\nworker_processes {workers};\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         upstream app {{ server {upstream}; keepalive 64; }}\n  \
         server {{ listen {listen}; location / {{ proxy_pass http://app; proxy_http_version 1.1; \
         proxy_set_header Connection \"\"; }} }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let mut child = Command::new(binary)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(listen, &mut child);
    Some((Process(child), listen))
}

/// CPU time (user and system, seconds) used so far by process `pid` and its children that are
/// still running (nginx's workers), from `/proc`.
fn cpu_seconds(pid: u32) -> f64 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    bench::cpu_seconds(pid)
        + children
            .split_whitespace()
            .map(|child| bench::cpu_seconds(child.parse().expect("a child's pid")))
            .sum::<f64>()
}

fn main() {
    // Re-run as the bare proxy, outside any runtime (Pingora makes its own).
    if let (Ok(listen), Ok(upstream)) =
        (std::env::var("BARE_LISTEN"), std::env::var("BARE_UPSTREAM"))
    {
        run_bare(&listen, &upstream);
    }
    tokio::runtime::Runtime::new().unwrap().block_on(measure());
}

async fn measure() {
    let rounds = env_u64("ROUNDS", 5);
    let seconds = env_u64("SECONDS", 3);
    let clients = env_u64("CLIENTS", 16) as usize;
    let upstream = Upstream::start().await;
    upstream.serve_static("/page", "text/html", bytes::Bytes::from(vec![b'x'; 1024]));
    let root = tempfile::tempdir_in(".").unwrap();
    let stitch = Stitch::start(root.path(), upstream.addr, ROUTES, true, &[]);
    let (bare_process, bare) = start_bare(upstream.addr);
    let nginx_dir = tempfile::tempdir().unwrap();
    let nginx = start_nginx(upstream.addr, nginx_dir.path());
    let mut targets = vec![
        ("Stitch", stitch.listen, stitch.child.id()),
        ("bare Pingora proxy", bare, bare_process.0.id()),
    ];
    if let Some((process, addr)) = &nginx {
        targets.push(("nginx", *addr, process.0.id()));
    }
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut costs: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for &(_, addr, _) in &targets {
        rate(
            clients,
            1,
            Arc::new(move |_| format!("http://{addr}/page")),
            &[200],
        )
        .await;
    }
    for round in 0..rounds as usize {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let (_, addr, pid) = targets[i];
            let url = Arc::new(move |_| format!("http://{addr}/page"));
            let (cpu, started) = (cpu_seconds(pid), Instant::now());
            let per_second = rate(clients, seconds, url, &[200]).await;
            let requests = per_second * started.elapsed().as_secs_f64();
            results[i].push(per_second);
            costs[i].push((cpu_seconds(pid) - cpu) / requests * 1e6);
        }
    }
    let medians: Vec<f64> = results.iter().cloned().map(median).collect();
    let cost_medians: Vec<f64> = costs.iter().cloned().map(median).collect();
    let machine = report::Machine::of(std::path::Path::new("."));
    let command = report::command("passthrough", &KNOBS);
    let mut goals = Vec::new();
    let mut report = format!(
        "# Benchmark: pass-through, same run\n\n\
         Machine: {machine}. {clients} keep-alive clients GET a 1 KiB page for {seconds} s through \
         each proxy in turn, {rounds} rounds, medians; the same upstream (in the bench process) \
         behind all of them. Stitch: the release binary with its default routes. Bare Pingora \
         proxy: Pingora 0.9.1 with only an upstream peer, in a process of its own. nginx: \
         Debian's, proxying with keep-alive. CPU per request: the proxy process's own user and \
         system time (nginx: its workers') over the requests it served; the client and the \
         upstream share the two cores, so the rate moves with them while this does not.\n\n\
         | proxy | requests/s | Stitch / this | CPU per request (us) | this / Stitch |\n\
         |---|---|---|---|---|\n",
    );
    for (((name, _, _), value), cost) in targets.iter().zip(&medians).zip(&cost_medians) {
        let (rate_ratio, cost_ratio) = (medians[0] / value, cost / cost_medians[0]);
        report.push_str(&format!(
            "| {name} | {value:.0} | {rate_ratio:.3} | {cost:.1} | {cost_ratio:.3} |\n",
        ));
        if *name == "bare Pingora proxy" {
            goals.push(Goal::at_least(
                "Stitch / bare Pingora proxy, requests/s",
                rate_ratio,
                BARE_AIM,
            ));
            goals.push(Goal::at_least(
                "bare Pingora proxy / Stitch, CPU per request (Stitch's speed by CPU)",
                cost_ratio,
                BARE_AIM,
            ));
        }
    }
    let [every_rate, every_cost] = [
        results
            .iter()
            .map(|r| r.iter().map(|v| v.round()).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        costs
            .iter()
            .map(|r| {
                r.iter()
                    .map(|v| (v * 10.0).round() / 10.0)
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>(),
    ];
    report.push_str(&format!(
        "\nEvery round, requests/s: {every_rate:?}; CPU per request (us): {every_cost:?}.\n\n\
         Produced by `{command}`.\n",
    ));
    if nginx.is_none() {
        report.push_str("\nnginx was not found (run .ci/setup): its row is missing.\n");
    }
    report::save_section("pass-through", &report);
    let names: Vec<&str> = targets.iter().map(|(name, _, _)| *name).collect();
    let figures = serde_json::json!({
        "proxies": names,
        "rounds": { "requests_per_s": every_rate, "cpu_per_request_us": every_cost },
    });
    report::save_json("pass-through", &report, &command, &machine, &goals, figures);
    println!("{report}");
}
