//! How `keepalive-agent policy …` reaches the running agent: one JSON request and one JSON
//! response per connection on a Unix socket in the runtime directory.
//!
//! The runtime directory is 0700 and the socket 0600, both owned by root, and the agent checks
//! the peer's uid with SO_PEERCRED; anyone else gets "permission denied" and changes nothing.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
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

/// A request for the agent's loop, and where its answer goes.
pub type Pending = (Request, tokio::sync::oneshot::Sender<Response>);

/// How long a control client may take to send its request, and to take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one connection of the agent keeping its state in `state_dir`, on a task of its own,
/// so a slow or stuck client never holds up the agent: checks the peer is root and names no
/// other state directory, reads one request, hands it to the agent's loop through `requests`
/// and writes the answer; [`CLIENT_TIMEOUT`] for each.
pub async fn serve_one(
    stream: tokio::net::UnixStream,
    state_dir: &Path,
    requests: tokio::sync::mpsc::Sender<Pending>,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
    let (read, mut write) = stream.into_split();
    let response = if uid != 0 {
        Response::failure(
            &Error::Permission("permission denied: policy commands need root".into()).into(),
        )
    } else {
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(read);
        tokio::time::timeout(CLIENT_TIMEOUT, reader.read_line(&mut line))
            .await
            .context("control client sent nothing")??;
        match serde_json::from_str::<Envelope>(&line) {
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
                    .send((envelope.request, reply))
                    .await
                    .map_err(|_| anyhow::anyhow!("the agent is stopping"))?;
                answer
                    .await
                    .map_err(|_| anyhow::anyhow!("the agent is stopping"))?
            }
            Err(err) => {
                Response::failure(&crate::error::usage(format!("malformed request: {err}")))
            }
        }
    };
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
    let path = socket_path(runtime_dir);
    let stream = UnixStream::connect(&path).map_err(|err| -> anyhow::Error {
        match err.kind() {
            std::io::ErrorKind::PermissionDenied => Error::Permission(format!(
                "permission denied: {} is root-only; policy commands need root",
                path.display()
            ))
            .into(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                Error::Agent(format!(
                    "no keepalive agent is running (nothing listens on {}); start it with \
                     `keepalive-agent run` or `systemctl start keepalive-agent`",
                    path.display()
                ))
                .into()
            }
            _ => {
                anyhow::Error::new(err).context(format!("failed to connect to {}", path.display()))
            }
        }
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut line = serde_json::to_string(&Envelope {
        request: request.clone(),
        state_dir: state_dir.map(Path::to_owned),
    })?;
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .context("failed to send the request")?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .context("failed to read the agent's answer")?;
    if answer.is_empty() {
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

    #[test]
    fn an_agent_that_stops_before_it_answers_is_no_agent_running() {
        let dir = std::env::temp_dir().join(format!("ka-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let _removed = TempDir(dir.clone());
        let listener = std::os::unix::net::UnixListener::bind(socket_path(&dir)).unwrap();
        // Reads the request, then goes away without a word.
        let agent = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            BufReader::new(&stream)
                .read_line(&mut String::new())
                .unwrap();
        });
        let err = call(&dir, None, &Request::List).unwrap_err();
        agent.join().unwrap();
        assert_eq!(code_of(&err), Some(exit::AGENT), "{err:#}");
        assert!(
            format!("{err:#}").contains("stopped before it answered"),
            "{err:#}"
        );
    }
}
