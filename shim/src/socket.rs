//! Where the agent's task server listens: the one contract between the shim binary, the agent
//! and its configuration, kept apart from the Task service so that a node built without pods
//! (the small node) can name it without building the ttrpc stack.

/// Where the agent's task server listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lichen/containerd-task.sock";
/// Environment variable naming the socket, read by the shim binary (containerd passes its own
/// environment to shims) and by the agent.
pub const SOCKET_ENV: &str = "LICHEN_TASK_SOCKET";
