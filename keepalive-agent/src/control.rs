//! How `keepalive-agent policy …` reaches the running agent: one JSON request and one JSON
//! response per connection on a Unix socket in the runtime directory.
//!
//! The runtime directory is 0700 and the socket 0600, both owned by root, and the agent checks
//! the peer's uid with SO_PEERCRED; anyone else gets "permission denied" and changes nothing.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{accept::Pacer, apply::ApplyReport, error::Error};

/// The control socket's file name inside the runtime directory.
pub const SOCKET_NAME: &str = "control.sock";

/// Path of the control socket.
pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(SOCKET_NAME)
}

/// The longest path a Unix socket can be bound to on Linux: `sun_path` less its NUL.
const SOCKET_PATH_MAX: usize = 107;

/// Parses `--runtime-dir`: an absolute path without `..` (see [`crate::pin::parse_dir`]) in
/// which the control socket's path fits a Unix socket address. A longer one is refused before
/// anything is made, rather than by `run` after it has attached.
pub fn parse_runtime_dir(text: &str) -> Result<PathBuf, String> {
    let dir = crate::pin::parse_dir(text)?;
    let len = socket_path(&dir).as_os_str().len();
    if len > SOCKET_PATH_MAX {
        return Err(format!(
            "{} is too long: the control socket in it, {SOCKET_NAME}, would have a path of {len} \
             bytes, and a Unix socket's is at most {SOCKET_PATH_MAX}",
            dir.display()
        ));
    }
    Ok(dir)
}

/// A request to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Re-read the config file.
    Reload,
    /// List effective policies.
    List,
    /// Set a runtime policy.
    Set {
        /// cgroup path or glob.
        cgroup: String,
        /// TCP_KEEPIDLE seconds.
        idle: Option<u32>,
        /// TCP_KEEPINTVL seconds.
        interval: Option<u32>,
        /// TCP_KEEPCNT.
        count: Option<u32>,
        /// TCP_USER_TIMEOUT milliseconds.
        user_timeout_ms: Option<u32>,
        /// Mode name.
        mode: Option<String>,
    },
    /// Remove a runtime policy or mask a config one.
    Unset {
        /// cgroup path or glob.
        cgroup: String,
    },
}

/// The command a request comes from, for the log: `policy set /app`, say.
impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reload => f.write_str("policy reload"),
            Self::List => f.write_str("policy list"),
            Self::Set { cgroup, .. } => write!(f, "policy set {cgroup}"),
            Self::Unset { cgroup } => write!(f, "policy unset {cgroup}"),
        }
    }
}

/// What goes over the socket: the request, and the state directory the client named.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    #[serde(flatten)]
    request: Request,
    /// `--state-dir` of the client, when given: an agent whose state is elsewhere refuses the
    /// request, so a change meant for one agent never reaches another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state_dir: Option<PathBuf>,
}

/// One effective policy, as `policy list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyRow {
    /// cgroup path, or `default`.
    pub cgroup: String,
    /// cgroup id (0 for the default).
    pub cgroup_id: u64,
    /// TCP_KEEPIDLE seconds.
    pub idle: u32,
    /// TCP_KEEPINTVL seconds.
    pub interval: u32,
    /// TCP_KEEPCNT.
    pub count: u32,
    /// TCP_USER_TIMEOUT milliseconds, null when left to the kernel.
    pub user_timeout: Option<u32>,
    /// Mode.
    pub mode: String,
    /// The selector that matched (the path itself or a glob).
    pub selector: String,
    /// Where it came from: `file:line`, `runtime`, `command line` or `built-in`.
    pub source: String,
}

/// The agent's answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not, when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Exit code the client should use on error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u8>,
    /// What changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Effective policies (list, and after changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<PolicyRow>>,
    /// Policies that select no cgroup yet: a path that does not exist, a glob that matches none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Vec<String>>,
    /// Config policies a `policy unset` masks until the next reload, of cgroups that exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked: Option<Vec<String>>,
    /// What applying to existing connections did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<ApplyReport>,
}

impl Response {
    /// A failure carrying the error's message and exit code (1 for an error of no kind, as
    /// the process would exit with).
    pub fn failure(err: &anyhow::Error) -> Self {
        Self {
            ok: false,
            error: Some(format!("{err:#}")),
            code: Some(crate::error::code_of(err).unwrap_or(crate::error::exit::FAILURE)),
            ..Self::default()
        }
    }
}

/// Sends one request to the agent on `runtime_dir`, which must keep its state in `state_dir`
/// when that is given; a refusal becomes an error with the agent's exit code.
pub fn call_agent(
    runtime_dir: &Path,
    state_dir: Option<&Path>,
    request: &Request,
) -> anyhow::Result<Response> {
    carried_out(call(runtime_dir, state_dir, request)?)
}

/// The response when the agent carried the request out, else its refusal as an error with the
/// agent's exit code.
pub fn carried_out(response: Response) -> anyhow::Result<Response> {
    if response.ok {
        return Ok(response);
    }
    Err(Error::Refused {
        message: response
            .error
            .clone()
            .unwrap_or_else(|| "request failed".into()),
        code: response.code.unwrap_or(crate::error::exit::FAILURE),
    }
    .into())
}

/// Listens on the control socket, root only. The caller holds the instance lock, so a
/// leftover socket file belongs to an agent that died.
pub fn bind(runtime_dir: &Path) -> anyhow::Result<ControlSocket> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = socket_path(runtime_dir);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("failed to listen on {}", path.display()))?;
    let socket = ControlSocket {
        listener,
        path,
        pacer: Pacer::new("control socket"),
    };
    std::fs::set_permissions(&socket.path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("failed to restrict {} to root", socket.path.display()))?;
    Ok(socket)
}

/// The agent's listening control socket; its file goes when the agent stops, however it stops.
pub struct ControlSocket {
    listener: tokio::net::UnixListener,
    path: PathBuf,
    pacer: Pacer,
}

impl ControlSocket {
    /// Lets `waiting` take clients in during passes (see [`Waiting::take_in`]), on a
    /// descriptor of its own for the same socket.
    pub fn share(&self, waiting: &Waiting) -> anyhow::Result<()> {
        let fd = self
            .listener
            .as_fd()
            .try_clone_to_owned()
            .context("failed to share the control socket")?;
        // Non-blocking already: the descriptors share the socket's file.
        waiting.lock().listener = Some(fd.into());
        Ok(())
    }

    /// The next client (see [`Pacer::accept`] for failed accept() calls).
    pub async fn accept(&mut self) -> tokio::net::UnixStream {
        let listener = &self.listener;
        self.pacer
            .accept(|| async { listener.accept().await.map(|(stream, _)| stream) })
            .await
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A request for the agent's loop, where its answer goes, and the client's connection.
pub struct Pending {
    /// The request.
    pub request: Request,
    /// Where the answer goes.
    pub reply: tokio::sync::oneshot::Sender<Response>,
    /// The connection's reading half, which the request was read from; it keeps the socket
    /// open until the request is answered or left, without a descriptor of its own (an agent
    /// out of descriptors still answers).
    client: tokio::net::unix::OwnedReadHalf,
}

impl Pending {
    /// Whether the client closed its connection while the request waited for its turn
    /// (`policy` was interrupted, or gave up waiting): nobody would learn what it did, so the
    /// agent leaves it. A client that only shut down its sending side still waits.
    pub fn client_left(&self) -> bool {
        crate::sys::hung_up(self.client.as_ref().as_fd())
    }

    /// The request and where its answer goes.
    pub fn split(self) -> (Request, tokio::sync::oneshot::Sender<Response>) {
        (self.request, self.reply)
    }
}

/// The control clients waiting for their answers, for the agent to show progress to while it
/// is busy with a pass (see [`crate::watchdog::Watchdog`]): that of their own request, or of
/// one before it, as requests are carried out one at a time. A client that connects while a
/// pass holds the agent's loop is taken in during the pass, so that it waits as those before
/// it do, and served once the loop is free.
#[derive(Clone, Default)]
pub struct Waiting(std::sync::Arc<std::sync::Mutex<Clients>>);

#[derive(Default)]
struct Clients {
    /// The connections of the clients taken in (see [`Waiting::add`]).
    listed: Vec<RawFd>,
    /// The control socket, shared with [`ControlSocket`], which takes clients in between
    /// passes; none until [`ControlSocket::share`].
    listener: Option<std::os::unix::net::UnixListener>,
    /// Clients taken in during a pass, until the loop serves them.
    taken: Vec<std::os::unix::net::UnixStream>,
}

/// The most clients a pass takes in; the others wait in the socket's backlog as before.
const TAKEN_MAX: usize = 16;

impl Waiting {
    /// Notes the connection `client` as waiting until the returned guard drops, which must be
    /// before the connection closes: the loop lists each client as it takes it in, before its
    /// task first runs (a pass may come first), and [`serve_one`] holds the guard beside the
    /// connection's halves, and drops it before writing the answer, so no sign of progress
    /// ever lands inside an answer. (A task dropped before it ran drops both at once, after
    /// the loop, which shows progress, has ended.)
    pub fn add(&self, client: &tokio::net::UnixStream) -> Added {
        let fd = client.as_raw_fd();
        self.lock().listed.push(fd);
        Added {
            waiting: self.clone(),
            fd,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Clients> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes in the clients that connected since the loop last took one, up to [`TAKEN_MAX`],
    /// and shows each progress at once: called during a pass, which keeps the loop from
    /// taking them. A failure leaves them to the loop.
    pub fn take_in(&self) {
        let mut clients = self.lock();
        while clients.taken.len() < TAKEN_MAX {
            let Some(Ok((stream, _))) = clients.listener.as_ref().map(|l| l.accept()) else {
                break;
            };
            crate::sys::nudge(stream.as_fd());
            clients.taken.push(stream);
        }
    }

    /// The clients taken in during a pass, for the loop to serve.
    pub fn taken(&self) -> Vec<std::os::unix::net::UnixStream> {
        std::mem::take(&mut self.lock().taken)
    }

    /// Whether any client waits.
    pub fn any(&self) -> bool {
        let clients = self.lock();
        !clients.listed.is_empty() || !clients.taken.is_empty()
    }

    /// Sends each waiting client a space (see [`crate::sys::nudge`]).
    pub fn nudge(&self) {
        let clients = self.lock();
        for &fd in &clients.listed {
            // SAFETY: the connection stays open while it is listed (see `add`).
            crate::sys::nudge(unsafe { BorrowedFd::borrow_raw(fd) });
        }
        for stream in &clients.taken {
            crate::sys::nudge(stream.as_fd());
        }
    }
}

/// A connection [`Waiting`] lists, until this drops.
pub struct Added {
    waiting: Waiting,
    fd: RawFd,
}

impl Drop for Added {
    fn drop(&mut self) {
        let listed = &mut self.waiting.lock().listed;
        if let Some(at) = listed.iter().position(|&fd| fd == self.fd) {
            listed.swap_remove(at);
        }
    }
}

/// How long a control client may take to send its request, and to take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest request the agent reads: a request is one JSON line of a few hundred bytes.
const MAX_REQUEST: u64 = 64 * 1024;

/// How long `policy` waits for a byte of the agent's answer. That may come after a pass over
/// every network namespace, behind other requests; while a pass runs (its own request's, or
/// another's before it), the agent sends a space every 5 s, each of which starts this wait
/// anew.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Reads one request line, at most [`MAX_REQUEST`] bytes within [`CLIENT_TIMEOUT`]: the
/// request, or the refusal to answer with; `None` when the client closed without sending a
/// byte (a probe of the socket), which needs no answer. `Err` when the connection itself
/// failed.
async fn read_request(
    read: impl tokio::io::AsyncRead + Unpin,
    timeout: Duration,
) -> std::io::Result<Option<Result<Envelope, anyhow::Error>>> {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST));
    let Ok(read) = tokio::time::timeout(timeout, reader.read_until(b'\n', &mut line)).await else {
        return Ok(Some(Err(crate::error::usage(format!(
            "no request within {}",
            humantime::format_duration(timeout)
        )))));
    };
    if read? == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\n") && line.len() as u64 == MAX_REQUEST {
        return Ok(Some(Err(crate::error::usage(format!(
            "request longer than {} KiB",
            MAX_REQUEST / 1024
        )))));
    }
    Ok(Some(serde_json::from_slice::<Envelope>(&line).map_err(
        |err| crate::error::usage(format!("malformed request: {err}")),
    )))
}

/// Serves one connection of the agent keeping its state in `state_dir`, on a task of its own,
/// so a slow or stuck client never holds up the agent: checks the peer is root and names no
/// other state directory, reads one request, hands it to the agent's loop through `requests`
/// and writes the answer; [`CLIENT_TIMEOUT`] for each. `added` lists the client as waiting
/// (see [`Waiting::add`]) until its answer is written.
pub async fn serve_one(
    stream: tokio::net::UnixStream,
    added: Added,
    state_dir: &Path,
    requests: tokio::sync::mpsc::Sender<Pending>,
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
    let (mut read, mut write) = stream.into_split();
    // Declared after the connection's halves, so it drops before them on every return.
    let added = added;
    let response = if uid != 0 {
        Response::failure(
            &Error::Permission("permission denied: policy commands need root".into()).into(),
        )
    } else {
        let request = read_request(&mut read, CLIENT_TIMEOUT)
            .await
            .context("failed to read a control request")?;
        let Some(request) = request else {
            log::debug!("a control client closed without a request");
            return Ok(());
        };
        match request {
            Ok(Envelope {
                state_dir: Some(named),
                ..
            }) if named != state_dir => Response::failure(
                &Error::Agent(format!(
                    "the agent on this runtime directory keeps its state in {}, not {}; name \
                     the runtime directory of the agent for {} with --runtime-dir",
                    state_dir.display(),
                    named.display(),
                    named.display()
                ))
                .into(),
            ),
            Ok(envelope) => {
                let (reply, answer) = tokio::sync::oneshot::channel();
                requests
                    .send(Pending {
                        request: envelope.request,
                        reply,
                        client: read,
                    })
                    .await
                    .map_err(|_| anyhow::anyhow!("the agent is stopping"))?;
                match answer.await {
                    Ok(response) => response,
                    // The agent left it: the client has gone (see [`Pending::client_left`]).
                    Err(_) if crate::sys::hung_up(write.as_ref().as_fd()) => return Ok(()),
                    Err(_) => anyhow::bail!("the agent is stopping"),
                }
            }
            Err(refusal) => Response::failure(&refusal),
        }
    };
    // No sign of progress from here on, so none lands inside the answer.
    drop(added);
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    tokio::time::timeout(CLIENT_TIMEOUT, write.write_all(out.as_bytes()))
        .await
        .context("control client did not take the answer")??;
    Ok(())
}

/// Sends one request to the agent and waits for its answer; see [`call_agent`].
pub fn call(
    runtime_dir: &Path,
    state_dir: Option<&Path>,
    request: &Request,
) -> anyhow::Result<Response> {
    call_within(runtime_dir, state_dir, request, ANSWER_TIMEOUT)
}

/// [`call`], waiting at most `timeout` for the answer.
fn call_within(
    runtime_dir: &Path,
    state_dir: Option<&Path>,
    request: &Request,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let path = socket_path(runtime_dir);
    let stream = UnixStream::connect(&path).map_err(|err| -> anyhow::Error {
        match err.kind() {
            std::io::ErrorKind::PermissionDenied => Error::Permission(format!(
                "permission denied: {} is root-only; policy commands need root",
                path.display()
            ))
            .into(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                Error::Agent(match crate::instance::running_agent(runtime_dir) {
                    // Its lock is held: starting it again would be refused.
                    Some(holder) => format!(
                        "the keepalive agent (pid {}) holds {}, but nothing listens on {}: it \
                         is still starting, or its control socket was removed; restart it \
                         (`systemctl restart keepalive-agent`) to serve policy commands again \
                         (enforcement goes on meanwhile)",
                        holder.pid,
                        runtime_dir.display(),
                        path.display()
                    ),
                    // One holds the state directory named: it runs with another runtime
                    // directory.
                    None => match state_dir
                        .and_then(|dir| Some((dir, crate::sys::flock_holder(dir)?)))
                    {
                        Some((dir, pid)) => format!(
                            "no keepalive agent listens on {}, but {} holds the state directory \
                             {}: it runs with another --runtime-dir; give the one it runs with",
                            path.display(),
                            match pid {
                                0 => "an agent in a container (its pid is not visible here)"
                                    .to_owned(),
                                pid => format!("the keepalive agent with pid {pid}"),
                            },
                            dir.display()
                        ),
                        None => format!(
                            "no keepalive agent is running (nothing listens on {}); start it \
                             with `keepalive-agent run` or `systemctl start keepalive-agent`",
                            path.display()
                        ),
                    },
                })
                .into()
            }
            // A file given for the directory (the socket itself, say): no agent can be there.
            std::io::ErrorKind::NotADirectory => Error::Usage(format!(
                "runtime directory {} is, or is below, a file, not a directory, so no agent \
                 listens there; give the runtime directory the agent runs with (default {})",
                runtime_dir.display(),
                crate::cli::DEFAULT_RUNTIME_DIR
            ))
            .into(),
            _ => {
                anyhow::Error::new(err).context(format!("failed to connect to {}", path.display()))
            }
        }
    })?;
    // A socket another user could have put there (in a directory they may change) is not the
    // agent's: the process listening must be root, or hold what running the agent takes.
    let (pid, uid) = crate::sys::peer_cred(&stream).context("failed to identify the agent")?;
    if uid != 0 {
        let not_the_agent = |why: &str| -> anyhow::Error {
            Error::Agent(format!(
                "{} is served by pid {pid} (uid {uid}), {why}, so it is not the agent; nothing \
                 was sent",
                path.display()
            ))
            .into()
        };
        // The capabilities read from /proc are the peer's only if it has not exited by the
        // end of the read: its pid may be another process's after. Its pidfd tells.
        let pidfd = match crate::sys::peer_pidfd(&stream) {
            Ok(pidfd) => pidfd,
            Err(err) if matches!(err.raw_os_error(), Some(libc::ESRCH | libc::EINVAL)) => {
                return Err(not_the_agent("which has exited"));
            }
            Err(err) => return Err(anyhow::Error::new(err).context("failed to identify the agent")),
        };
        let caps = crate::privileges::Caps::of(&pid.to_string());
        if pidfd.is_some_and(|fd| crate::sys::exited(fd.as_fd())) {
            return Err(not_the_agent("which has exited"));
        }
        if !caps.could_run_agent() {
            return Err(not_the_agent(
                "which is neither root nor able to run the agent (CAP_BPF and CAP_NET_ADMIN)",
            ));
        }
    }
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(&Envelope {
        request: request.clone(),
        state_dir: state_dir.map(Path::to_owned),
    })?;
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .context("failed to send the request")?;
    let mut answer = String::new();
    if let Err(err) = BufReader::new(&stream).read_line(&mut answer) {
        if matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            // The agent has the request, and may have begun it; one still queued is dropped
            // when this connection closes.
            return Err(Error::Agent(format!(
                "the agent did not answer, nor show progress, for {}; the request may still \
                 be carried out if the agent had begun it, and is dropped if not \
                 (`keepalive-agent policy list` shows what holds)",
                humantime::format_duration(timeout)
            ))
            .into());
        }
        return Err(anyhow::Error::new(err).context("failed to read the agent's answer"));
    }
    // Spaces alone are signs of progress, no answer.
    if answer.trim().is_empty() {
        // The agent stopped with the request queued (a SIGTERM during a long pass, say), or
        // went down while it ran.
        return Err(Error::Agent(
            "the agent stopped before it answered; the request may not have been carried out \
             (`keepalive-agent policy list` shows what holds once it runs again)"
                .into(),
        )
        .into());
    }
    serde_json::from_str(&answer).with_context(|| format!("unexpected answer: {answer:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{code_of, exit};

    /// A directory removed on drop, also when the test fails.
    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// What `policy list`, waiting `timeout` for each byte, gets from an agent that takes the
    /// request and then does `then` with the connection.
    fn ask(
        tag: &str,
        timeout: Duration,
        then: impl FnOnce(&UnixStream) + Send + 'static,
    ) -> anyhow::Result<Response> {
        let dir = std::env::temp_dir().join(format!("ka-control-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let _removed = TempDir(dir.clone());
        let listener = std::os::unix::net::UnixListener::bind(socket_path(&dir)).unwrap();
        let agent = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            BufReader::new(&stream)
                .read_line(&mut String::new())
                .unwrap();
            then(&stream);
        });
        let answer = call_within(&dir, None, &Request::List, timeout);
        agent.join().unwrap();
        answer
    }

    /// The error `policy list` gets, waiting `timeout`, from an agent that takes the request
    /// and then, after `after`, goes away without a word.
    fn unanswered(tag: &str, after: Duration, timeout: Duration) -> anyhow::Error {
        let err = ask(tag, timeout, move |_| std::thread::sleep(after)).unwrap_err();
        assert_eq!(code_of(&err), Some(exit::AGENT), "{err:#}");
        err
    }

    #[test]
    fn spaces_from_an_agent_busy_with_a_pass_keep_the_client_waiting() {
        // Six spaces 100 ms apart, then the answer: 600 ms in all, with every byte well
        // within the 200 ms the client waits for one.
        let response = ask("progress", Duration::from_millis(200), |mut stream| {
            for _ in 0..6 {
                std::thread::sleep(Duration::from_millis(100));
                stream.write_all(b" ").unwrap();
            }
            stream.write_all(b"{\"ok\":true}\n").unwrap();
        })
        .unwrap();
        assert!(response.ok, "{response:?}");
    }

    #[test]
    fn an_agent_that_stops_before_it_answers_is_no_agent_running() {
        let err = unanswered("gone", Duration::ZERO, ANSWER_TIMEOUT);
        assert!(
            format!("{err:#}").contains("stopped before it answered"),
            "{err:#}"
        );
    }

    #[test]
    fn an_agent_that_stops_after_signs_of_progress_stopped_before_it_answered() {
        let err = ask("spaces", ANSWER_TIMEOUT, |mut stream| {
            stream.write_all(b"  ").unwrap();
        })
        .unwrap_err();
        assert_eq!(code_of(&err), Some(exit::AGENT), "{err:#}");
        assert!(
            format!("{err:#}").contains("stopped before it answered"),
            "{err:#}"
        );
    }

    #[test]
    fn an_answer_that_does_not_come_in_time_may_still_be_carried_out() {
        // As an agent busy with a long pass.
        let err = unanswered(
            "slow",
            Duration::from_millis(600),
            Duration::from_millis(200),
        );
        assert!(
            format!("{err:#}")
                .contains("did not answer, nor show progress, for 200ms; the request may still"),
            "{err:#}"
        );
    }

    /// What the agent makes of `sent` on a connection the client then leaves open.
    async fn refusal(sent: &[u8]) -> String {
        use tokio::io::AsyncWriteExt as _;
        let (agent, mut client) = tokio::net::UnixStream::pair().unwrap();
        let sent = sent.to_vec();
        let writer = tokio::spawn(async move {
            // The agent stops reading at its limit; what it left unread fails here.
            let _ = client.write_all(&sent).await;
            client
        });
        let read = read_request(agent, Duration::from_millis(200))
            .await
            .unwrap()
            .expect("a request was sent or the connection left open");
        drop(writer);
        format!("{:#}", read.expect_err("refused"))
    }

    #[tokio::test]
    async fn requests_that_are_too_long_malformed_or_never_sent_are_answered_with_why() {
        let long = vec![b' '; MAX_REQUEST as usize + 10];
        assert_eq!(refusal(&long).await, "request longer than 64 KiB");
        assert!(
            refusal(b"{\"cmd\":\"li\xffst\"}\n")
                .await
                .starts_with("malformed request: "),
        );
        assert_eq!(refusal(b"").await, "no request within 200ms");
        let ok = read_request(&b"{\"cmd\":\"list\"}\n"[..], Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(ok.request, Request::List));
        // Connected and closed at once (a probe of the socket): nothing to answer.
        let closed = read_request(&b""[..], Duration::from_secs(1))
            .await
            .unwrap();
        assert!(closed.is_none(), "{closed:?}");
    }
}
