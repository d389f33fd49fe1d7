//! The Kubernetes path without kubelet: a Rust CRI client (the `k8s-cri` crate) on a real
//! containerd's CRI socket does what kubelet does for a pod whose RuntimeClass handler is
//! `lichen`: RunPodSandbox, CreateContainer, StartContainer, ContainerStatus, the container's
//! log file, StopPodSandbox, RemovePodSandbox. The pause image is built and imported locally.
//!
//! The task server is the real agent (`lichen run`): the container's Wasm runs in it, shows in
//! `lichen ps` by pod and container name, and its output reaches the pod's log file.

use std::path::Path;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use lichen_tests::containerd::{
    Containerd, DEADLINE, ImageFile, ImageSpec, PAUSE_IMAGE, sleeper_wasm, tools_present,
};
use tonic::transport::{Channel, Endpoint, Uri};

const HELLO: &str = "lichen.test/hello:1";

async fn connect(socket: &Path) -> RuntimeServiceClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("containerd's CRI socket answers");
    RuntimeServiceClient::new(channel)
}

fn sandbox_config(dir: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "blink".into(),
            uid: "0b1f6a52-5c2e-4c52-9a3c-lichen".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: dir.join("pod-logs").display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                // Host network: no CNI plugin is installed here, as with hostNetwork pods.
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Pod as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn kubelets_calls_run_a_pod_on_the_lichen_runtime_handler() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("lcri")
        .tempdir_in("/tmp")
        .unwrap();
    let socket = dir.path().join("task.sock");
    let export = format!("export {}='{}'", lichen_shim::SOCKET_ENV, socket.display());
    let daemon = lichen_tests::Daemon::start_with(&[], Some(&export)).unwrap();
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            started.elapsed() < DEADLINE,
            "the agent serves no task API\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut ctrd = Containerd::start(&socket, true).unwrap();
    ctrd.set_namespace("k8s.io");
    ctrd.import(&ImageSpec {
        name: PAUSE_IMAGE.into(),
        files: vec![ImageFile::new(
            "pause",
            b"not run: the sandbox runs nothing".to_vec(),
        )],
        entrypoint: vec!["/pause".into()],
        cmd: vec![],
    })
    .unwrap();
    ctrd.import(&ImageSpec {
        name: HELLO.into(),
        files: vec![ImageFile::new("app/hello.wasm", sleeper_wasm())],
        entrypoint: vec!["/app/hello.wasm".into()],
        cmd: vec![],
    })
    .unwrap();
    std::fs::create_dir_all(dir.path().join("pod-logs")).unwrap();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(async {
        let mut cri = connect(&ctrd.socket()).await;
        let config = sandbox_config(dir.path());
        let sandbox = cri
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: "lichen".into(),
            })
            .await
            .map_err(|e| format!("RunPodSandbox: {e}"))?
            .into_inner()
            .pod_sandbox_id;
        assert!(
            daemon.ps().is_empty(),
            "the sandbox never reaches the agent"
        );

        let container = cri
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: "hello".into(),
                        attempt: 0,
                    }),
                    image: Some(k8s_cri::v1::ImageSpec {
                        image: HELLO.into(),
                        ..Default::default()
                    }),
                    log_path: "hello.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(config),
            })
            .await
            .map_err(|e| format!("CreateContainer: {e}"))?
            .into_inner()
            .container_id;
        cri.start_container(StartContainerRequest {
            container_id: container.clone(),
        })
        .await
        .map_err(|e| format!("StartContainer: {e}"))?;

        // CRI creates the task (and so the agent's workload) at StartContainer; `ps` names it
        // by pod and container.
        let row = daemon
            .status("blink-hello")
            .ok_or_else(|| format!("lichen ps shows no blink-hello: {:?}", daemon.ps()))?;
        assert_eq!(row.source, "pods");
        assert_eq!(
            (
                row.labels.get("namespace").map(String::as_str),
                row.labels.get("pod").map(String::as_str),
                row.labels.get("container").map(String::as_str)
            ),
            (Some("default"), Some("blink"), Some("hello")),
            "{row:?}"
        );

        // What it printed reaches the pod's log file while it runs.
        let log_file = dir.path().join("pod-logs/hello.log");
        let started = Instant::now();
        loop {
            let log = std::fs::read_to_string(&log_file).unwrap_or_default();
            if log.contains(" stdout F sleeping") {
                break;
            }
            if started.elapsed() > DEADLINE {
                return Err(format!("no output in the container's log file: {log}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // kubelet stops it (SIGTERM); the exit reaches CRI through the shim's TaskExit event.
        cri.stop_container(StopContainerRequest {
            container_id: container.clone(),
            timeout: 10,
        })
        .await
        .map_err(|e| format!("StopContainer: {e}"))?;
        let started = Instant::now();
        let status = loop {
            let status = cri
                .container_status(ContainerStatusRequest {
                    container_id: container.clone(),
                    verbose: false,
                })
                .await
                .map_err(|e| format!("ContainerStatus: {e}"))?
                .into_inner()
                .status
                .expect("a status");
            if status.state == ContainerState::ContainerExited as i32 {
                break status;
            }
            if started.elapsed() > DEADLINE {
                return Err(format!("the container did not exit: {status:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(status.exit_code, 128 + 15, "killed by SIGTERM: {status:?}");
        let log = std::fs::read_to_string(dir.path().join("pod-logs/hello.log"))
            .map_err(|e| format!("the container's log file: {e}"))?;
        assert!(log.contains(" stdout F sleeping"), "{log}");

        cri.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: sandbox.clone(),
        })
        .await
        .map_err(|e| format!("StopPodSandbox: {e}"))?;
        let sandbox_status = cri
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.clone(),
                verbose: false,
            })
            .await
            .map_err(|e| format!("PodSandboxStatus: {e}"))?
            .into_inner()
            .status
            .expect("a sandbox status");
        assert_eq!(
            sandbox_status.state,
            PodSandboxState::SandboxNotready as i32
        );
        cri.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: sandbox,
        })
        .await
        .map_err(|e| format!("RemovePodSandbox: {e}"))?;
        let left = cri
            .list_containers(ListContainersRequest { filter: None })
            .await
            .map_err(|e| format!("ListContainers: {e}"))?
            .into_inner()
            .containers;
        assert!(left.is_empty(), "{left:?}");
        Ok::<(), String>(())
    });
    if let Err(e) = result {
        panic!("{e}\ncontainerd log:\n{}", ctrd.log_tail());
    }
    assert!(daemon.ps().is_empty(), "the agent forgot the workload");
    assert!(
        ctrd.mounts_left()
            .iter()
            .all(|m| !m.contains("io.containerd.runtime.v2.task")),
        "{:?}",
        ctrd.mounts_left()
    );
}
