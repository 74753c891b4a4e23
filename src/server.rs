//! Wiring: builds the Pingora server from a [`Config`] (storage, upload core, proxy service,
//! expiry sweeper) and runs it, in the foreground (`stitch`) or in a thread (tests, benchmarks).

use crate::config::{Config, ConnectionLimits};
use crate::drain::InFlight;
use crate::forward::HttpForwarder;
use crate::proxy::connections::Guarded;
use crate::proxy::StitchProxy;
use crate::upload::{SystemClock, Ttls, UploadCore};
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{
    RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch, UnixShutdownSignalWatch,
};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] crate::store::OpenError),
    #[error("nothing accepts connections on {0} (is the port taken?)")]
    Listen(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A ready-to-run server, and a handle to tell when its storage has been let go.
pub struct Built {
    pub server: Server,
    pub storage: StorageHandle,
    pub in_flight: InFlight,
    /// Delivered uploads whose parts are being removed after their answer was given.
    pub cleanups: InFlight,
    /// The uploads, to stop the appends under way on a graceful shutdown.
    pub core: Arc<UploadCore>,
}

/// Tells when every user of the storage is gone. Pingora's fast shutdown lets tasks outlive
/// `Server::run`, and the storage stays open until the last of them is dropped.
pub struct StorageHandle(Arc<AtomicBool>);

impl StorageHandle {
    /// Waits (up to `within`) until the storage is closed; true if it is.
    pub fn wait_closed(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.0.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

/// How the process runs: in the foreground or the background, fresh or taking over the
/// listeners of a running Stitch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Launch {
    /// Fork into the background, writing `process.pid_file` (`stitch --daemon`).
    pub daemon: bool,
    /// Take the listeners of the Stitch running with the same `process.upgrade_socket`, which
    /// hands them over on SIGQUIT and drains (`stitch --upgrade`).
    pub upgrade: bool,
}

/// Builds a ready-to-run server.
pub fn build(config: &Config) -> Result<Built, StartError> {
    build_as(config, Launch::default())
}

/// Builds a ready-to-run server that runs as `launch` says. With `upgrade`, this waits (a few
/// seconds) for the running Stitch to send its listeners.
pub fn build_as(config: &Config, launch: Launch) -> Result<Built, StartError> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let engines = crate::store::open(&config.storage)?;
    let storage = StorageHandle(engines.closed());
    let in_flight = InFlight::default();
    let core = Arc::new(UploadCore::new(
        engines,
        Arc::new(HttpForwarder::new(
            config.upstream,
            config.connect_timeout.0,
        )),
        Arc::new(SystemClock),
        Ttls {
            upload: config.storage.upload_ttl,
            result: config.storage.result_ttl,
        },
        in_flight.clone(),
    ));
    // Pingora counts whole seconds: a grace of 500ms is 1 s, not 0.
    let grace = config.shutdown_grace.0.as_secs_f64().ceil() as u64;
    let options = pingora::server::configuration::Opt {
        upgrade: launch.upgrade,
        daemon: launch.daemon,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(
        Some(options),
        ServerConf {
            threads: config.threads(),
            grace_period_seconds: Some(grace),
            graceful_shutdown_timeout_seconds: Some(grace.max(1)),
            // Disk work (staging writes, fsyncs) runs on the blocking pool. Hundreds of slow
            // clients finishing at once would otherwise start a thread each (tokio allows 512),
            // and memory would stay high after they left; the disk does not go faster with
            // more than a few dozen fsyncs in flight.
            max_blocking_threads: Some(BLOCKING_THREADS),
            daemon: launch.daemon,
            pid_file: config.process.pid_file.display().to_string(),
            upgrade_sock: config.process.upgrade_socket.display().to_string(),
            // A daemon keeps the directory it was started in: relative paths keep their meaning.
            working_directory: std::env::current_dir().ok(),
            ..Default::default()
        },
    );
    server.bootstrap();
    let proxy = pingora::proxy::http_proxy(
        &server.configuration,
        StitchProxy::new(config, core.clone()),
    );
    let mut proxy = Service::new(
        "stitch proxy".to_string(),
        Guarded::new(proxy, config.connections.clone(), in_flight.clone()),
    );
    proxy.add_tcp(&config.listen.to_string());
    server.add_service(proxy);
    let interval = config
        .storage
        .upload_ttl
        .min(config.storage.result_ttl)
        .div_f64(10.0)
        .clamp(Duration::from_secs(1), Duration::from_secs(300));
    let sweeper = Sweeper {
        core: core.clone(),
        interval,
        in_flight: in_flight.clone(),
    };
    server.add_service(background_service("expiry", sweeper));
    let queue = Queue {
        core: core.clone(),
        routes: config
            .routes
            .iter()
            .map(|r| (r.id.clone(), r.forward.clone()))
            .collect(),
        in_flight: in_flight.clone(),
    };
    server.add_service(background_service("delivery queue", queue));
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    server.add_service(background_service("memory trim", Trim));
    if let Some(metrics) = &config.metrics {
        let app = crate::metrics::OperatorsApp {
            core: core.clone(),
            upstream: config.upstream,
            config: metrics.clone(),
            store_check: Default::default(),
        };
        // Meant for a private network, but guarded all the same: a scraper or a probe gone
        // wrong (or a client trickling its header) cannot hold the process's memory.
        let limits = ConnectionLimits {
            max: OPERATORS_MAX_CONNECTIONS,
            max_per_client: Some(OPERATORS_MAX_PER_CLIENT),
            ..config.connections.clone()
        };
        let mut operators = Service::new(
            "metrics and health".to_string(),
            Guarded::new(app, limits, InFlight::default()),
        );
        operators.add_tcp(&metrics.listen.to_string());
        server.add_service(operators);
    }
    let cleanups = core.cleanups();
    Ok(Built {
        server,
        storage,
        in_flight,
        cleanups,
        core,
    })
}

/// Deletes expired uploads and answers now and then.
struct Sweeper {
    core: Arc<UploadCore>,
    interval: Duration,
    in_flight: InFlight,
}

#[async_trait]
impl BackgroundService for Sweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
            let _working = self.in_flight.start();
            let span = tracing::info_span!("expiry");
            match self.core.sweep().instrument(span).await {
                Ok(0) => {}
                Ok(n) => tracing::info!("expired {n} uploads"),
                Err(e) => tracing::error!("expiry sweep failed: {e}"),
            }
        }
    }
}

/// Retries the deliveries that are owed (see `upload::queue`), looking every second.
struct Queue {
    core: Arc<UploadCore>,
    /// Each route's forward settings, by route id.
    routes: std::collections::HashMap<String, crate::config::ForwardConfig>,
    in_flight: InFlight,
}

#[async_trait]
impl BackgroundService for Queue {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(QUEUE_INTERVAL) => {}
            }
            let _working = self.in_flight.start();
            let span = tracing::info_span!("queue");
            let forward_for = |id: &str| self.routes.get(id).cloned();
            if let Err(e) = self.core.deliver_due(&forward_for).instrument(span).await {
                tracing::error!("reading the delivery queue failed: {e}");
            }
        }
    }
}

/// Gives memory freed after a burst of clients back to the system. glibc keeps freed memory
/// in its per-thread arenas, so without this a process that once served hundreds of clients at
/// once stays that large.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
struct Trim;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[async_trait]
impl BackgroundService for Trim {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(TRIM_INTERVAL) => {}
            }
            // SAFETY: malloc_trim only returns free memory to the system; it takes the
            // allocator's own locks and touches nothing of ours.
            tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) });
        }
    }
}

/// The operators' listener (metrics, health, listing): connections open at once, in all and
/// from one address (a scraper and a few probes need a handful).
const OPERATORS_MAX_CONNECTIONS: usize = 256;
const OPERATORS_MAX_PER_CLIENT: usize = 32;

/// How often freed memory is given back.
const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// The blocking pool's threads, per service runtime.
const BLOCKING_THREADS: usize = 32;

/// How often the delivery queue is looked at.
const QUEUE_INTERVAL: Duration = Duration::from_secs(1);

/// A server running in a thread of this process, stopped on `stop()` or drop.
pub struct Running {
    pub addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    storage: StorageHandle,
    cleanups: InFlight,
}

struct StopSignal(tokio::sync::watch::Receiver<bool>);

#[async_trait]
impl ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> ShutdownSignal {
        let mut stop = self.0.clone();
        let _ = stop.wait_for(|stop| *stop).await;
        ShutdownSignal::FastShutdown
    }
}

/// Starts a server in a background thread and waits until it accepts connections. With port
/// 0 in `listen`, a free port is chosen (Pingora cannot report the port it was given), and
/// chosen again should another process take it first; `Running::addr` says which.
pub fn spawn(config: &Config) -> Result<Running, StartError> {
    if config.listen.port() != 0 {
        let running = spawn_on(config)?;
        if !owns_listener(std::process::id(), running.addr) {
            running.stop();
            return Err(StartError::Listen(config.listen));
        }
        return Ok(running);
    }
    let mut last = None;
    for _ in 0..5 {
        let mut config = config.clone();
        config.listen = free_port(config.listen)?;
        match spawn_on(&config) {
            Ok(running) if owns_listener(std::process::id(), running.addr) => return Ok(running),
            Ok(running) => {
                // Another process took the port between our choosing it and Pingora's bind.
                last = Some(StartError::Listen(running.addr));
                running.stop();
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tried at least once"))
}

/// An unused port on `addr`'s address (bound, then released: another process may take it
/// before the server binds it, which [`spawn`] checks).
fn free_port(addr: SocketAddr) -> Result<SocketAddr, StartError> {
    std::net::TcpListener::bind(addr)
        .and_then(|listener| listener.local_addr())
        .map_err(|source| StartError::Bind { addr, source })
}

fn spawn_on(config: &Config) -> Result<Running, StartError> {
    let Built {
        server,
        storage,
        cleanups,
        ..
    } = build(config)?;
    let (stop, watch) = tokio::sync::watch::channel(false);
    let thread = std::thread::spawn(move || {
        server.run(RunArgs {
            shutdown_signal: Box::new(StopSignal(watch)),
        })
    });
    let running = Running {
        addr: config.listen,
        stop,
        thread: Some(thread),
        storage,
        cleanups,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(config.listen).is_err() {
        if Instant::now() > deadline {
            return Err(StartError::Listen(config.listen));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(running)
}

/// Is the socket listening on `addr` one of process `pid`'s? (Linux: the listening socket's
/// inode, from `/proc/net/tcp`, among the process's file descriptors.) Elsewhere, assumed so.
pub fn owns_listener(pid: u32, addr: SocketAddr) -> bool {
    let Ok(table) = std::fs::read_to_string(match addr {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    }) else {
        return true;
    };
    let port = format!(":{:04X}", addr.port());
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 9 && f[1].ends_with(&port) && f[3] == "0A")
        .map(|f| format!("socket:[{}]", f[9]))
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return true;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.to_str() == Some(i.as_str())))
    })
}

impl Running {
    /// Waits (up to `within`) until no delivered upload's parts are still being removed (the
    /// answer is given before); true if none are.
    pub fn wait_settled(&self, within: Duration) -> bool {
        self.cleanups.wait_idle(within)
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Stops the server and returns once its storage is closed (a new server can open it).
    fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
            if !self.storage.wait_closed(Duration::from_secs(30)) {
                tracing::error!("the stopped server's storage is still in use after 30 s");
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Fails early, with a clear message, if an address cannot be listened on (Pingora would
/// panic inside its service thread and leave the process running without the listener).
pub fn check_can_listen(addr: SocketAddr) -> Result<(), StartError> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .map_err(|source| StartError::Bind { addr, source })
}

/// Runs until SIGINT (fast), SIGTERM (graceful) or SIGQUIT (hands the listeners to a new
/// Stitch started with `--upgrade`, then drains). `ready` is called once the server accepts
/// connections on `listen`, so that its line comes after everything start-up prints, errors
/// included.
pub fn run(config: &Config, ready: impl FnOnce() + Send + 'static) -> Result<(), StartError> {
    run_as(config, Launch::default(), ready)
}

/// Runs as `launch` says (see [`run`]).
pub fn run_as(
    config: &Config,
    launch: Launch,
    ready: impl FnOnce() + Send + 'static,
) -> Result<(), StartError> {
    if !launch.upgrade {
        // Upgrading, the listeners are the running Stitch's, handed over.
        check_can_listen(config.listen)?;
    }
    run_built(build_as(config, launch)?, config, ready);
    Ok(())
}

/// Runs a built server (see [`run`]).
pub fn run_built(mut built: Built, config: &Config, ready: impl FnOnce() + Send + 'static) {
    let signals = Signals {
        in_flight: built.in_flight,
        grace: config.shutdown_grace.0,
        core: built.core,
    };
    // A service, not a thread started here: a daemon forks when the server runs, and only
    // the forking thread goes on in the child.
    let announce = Announce {
        listen: config.listen,
        ready: std::sync::Mutex::new(Some(Box::new(ready))),
    };
    built
        .server
        .add_service(background_service("ready announcement", announce));
    built.server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
}

/// Calls `ready` once `listen` accepts connections.
struct Announce {
    listen: SocketAddr,
    ready: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

#[async_trait]
impl BackgroundService for Announce {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(self.listen).await.is_err()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ready = self.ready.lock().expect("not poisoned").take();
        if let Some(ready) = ready {
            ready();
        }
        // Pingora logs a service that ends: the announcement stays the last line.
        let _ = shutdown.changed().await;
    }
}

/// Pingora's signals (SIGINT fast, SIGTERM graceful, SIGQUIT graceful upgrade), except that a
/// graceful shutdown or upgrade ends as soon as nothing is in flight: Pingora itself always
/// waits out the whole grace period, even with nothing to wait for.
struct Signals {
    in_flight: InFlight,
    grace: Duration,
    core: Arc<UploadCore>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let signal = UnixShutdownSignalWatch.recv().await;
        // Pingora stops accepting first: at once on SIGTERM; on SIGQUIT once it has sent the
        // listeners and given the new process time to take them (5 s). Then only work in
        // flight remains.
        let stops_accepting = match signal {
            ShutdownSignal::GracefulTerminate => Some(Duration::from_millis(200)),
            ShutdownSignal::GracefulUpgrade => Some(Duration::from_millis(5_500)),
            ShutdownSignal::FastShutdown => None,
        };
        if let Some(after) = stops_accepting {
            let (in_flight, grace) = (self.in_flight.clone(), self.grace);
            let core = self.core.clone();
            std::thread::spawn(move || {
                std::thread::sleep(after);
                // A body that would outlast the grace period (a whole file in one tus PATCH)
                // keeps what arrived and is answered now: its client resumes from there.
                core.stop_appends();
                if in_flight.wait_idle(grace) {
                    tracing::info!("nothing in flight; exiting");
                    std::process::exit(0);
                }
            });
        }
        signal
    }
}
