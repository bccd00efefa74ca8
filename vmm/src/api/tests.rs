use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use vmm_sys_util::tempdir::TempDir;

use super::*;

/// A VM whose pause and resume do what they are told, or fail with `refuse`.
struct FakeVm {
    state: RunState,
    refuse: Option<&'static str>,
    snapshots: Vec<PathBuf>,
}

impl VmControl for FakeVm {
    fn state(&self) -> RunState {
        self.state
    }
    fn pause(&mut self) -> Result<(), String> {
        if let Some(why) = self.refuse {
            return Err(why.into());
        }
        self.state = RunState::Paused;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.state = RunState::Running;
        Ok(())
    }
    fn shape(&self) -> (u8, u64) {
        (2, 256)
    }
    fn snapshot(&mut self, dir: &Path) -> Result<(), String> {
        self.snapshots.push(dir.to_path_buf());
        Ok(())
    }
}

fn fake() -> FakeVm {
    FakeVm {
        state: RunState::Running,
        refuse: None,
        snapshots: Vec::new(),
    }
}

fn reply(served: Served) -> serde_json::Value {
    let (Served::Reply(r) | Served::Shutdown(r)) = served;
    serde_json::from_str(&r).unwrap()
}

#[test]
fn status_pause_resume_and_shutdown() {
    let mut vm = fake();
    let status = reply(handle_line(r#"{"request":"status"}"#, &mut vm));
    assert_eq!(
        status,
        json!({"ok": true, "state": "running", "vcpus": 2, "memory_mib": 256})
    );
    let paused = reply(handle_line("{\"request\": \"pause\"}\n", &mut vm));
    assert_eq!(paused, json!({"ok": true, "state": "paused"}));
    assert_eq!(vm.state, RunState::Paused);
    let resumed = reply(handle_line(r#"{"request":"resume"}"#, &mut vm));
    assert_eq!(resumed, json!({"ok": true, "state": "running"}));
    let end = handle_line(r#"{"request":"shutdown"}"#, &mut vm);
    assert!(matches!(end, Served::Shutdown(_)), "{end:?}");
}

#[test]
fn bad_requests_get_an_error_reply() {
    let mut vm = fake();
    for line in [
        "",
        "status",
        "{}",
        r#"{"request":"reboot"}"#,
        r#"{"request":"pause","extra":1}"#,
        r#"{"request":"snapshot"}"#,
        r#"{"request":"snapshot","dir":"/s","x":1}"#,
        r#"{"request":7}"#,
        "\u{0}\u{ff}",
    ] {
        let r = reply(handle_line(line, &mut vm));
        assert_eq!(r["ok"], false, "{line:?}: {r}");
        let msg = r["error"].as_str().unwrap();
        assert!(msg.starts_with("bad request: "), "{line:?}: {msg}");
    }
    assert_eq!(vm.state, RunState::Running);
}

#[test]
fn pause_and_resume_refuse_what_is_already_so_or_fails() {
    let mut vm = fake();
    let r = reply(handle_line(r#"{"request":"resume"}"#, &mut vm));
    assert_eq!(r, json!({"ok": false, "error": "the VM is running"}));
    vm.refuse = Some("vCPU 1 did not stop");
    let r = reply(handle_line(r#"{"request":"pause"}"#, &mut vm));
    assert_eq!(r, json!({"ok": false, "error": "vCPU 1 did not stop"}));
    vm.refuse = None;
    handle_line(r#"{"request":"pause"}"#, &mut vm);
    let r = reply(handle_line(r#"{"request":"pause"}"#, &mut vm));
    assert_eq!(r, json!({"ok": false, "error": "the VM is paused already"}));
}

/// Sends `lines` on one connection, serves it, and returns the replies.
fn over_socket(api: &ApiSocket, path: &Path, vm: &mut FakeVm, lines: &str) -> (bool, Vec<String>) {
    let mut client = UnixStream::connect(path).unwrap();
    client.write_all(lines.as_bytes()).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let shutdown = api.serve(vm);
    let replies = BufReader::new(client).lines().map(Result::unwrap).collect();
    (shutdown, replies)
}

#[test]
fn the_socket_serves_lines_in_order_and_goes_away_with_the_vm() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("api.sock");
    let api = ApiSocket::bind(&path).unwrap();
    let mut vm = fake();
    // Nothing waiting: nothing served.
    assert!(!api.serve(&mut vm));
    let lines = "{\"request\":\"pause\"}\nnonsense\n{\"request\":\"status\"}\n";
    let (shutdown, replies) = over_socket(&api, &path, &mut vm, lines);
    assert!(!shutdown);
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert!(replies[1].contains("bad request"), "{replies:?}");
    assert!(replies[2].contains(r#""state":"paused""#), "{replies:?}");

    let long = format!("{}\n", "x".repeat(MAX_LINE as usize + 10));
    let (_, replies) = over_socket(&api, &path, &mut vm, &long);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert!(replies[0].contains("too long"), "{replies:?}");

    let (shutdown, _) = over_socket(&api, &path, &mut vm, "{\"request\":\"shutdown\"}\n");
    assert!(shutdown);
    drop(api);
    assert!(!path.exists());
}

#[test]
fn a_socket_in_use_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("api.sock");
    let _first = ApiSocket::bind(&path).unwrap();
    let err = ApiSocket::bind(&path).err().unwrap();
    assert!(
        matches!(err, ApiError::Listen(ListenError::InUse(_))),
        "{err}"
    );
}

#[test]
fn a_snapshot_is_taken_only_of_a_paused_vm() {
    let mut vm = fake();
    let line = r#"{"request":"snapshot","dir":"/tmp/s"}"#;
    let r = reply(handle_line(line, &mut vm));
    assert_eq!(r["error"], "pause the VM before a snapshot");
    assert!(vm.snapshots.is_empty());
    handle_line(r#"{"request":"pause"}"#, &mut vm);
    let r = reply(handle_line(line, &mut vm));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(vm.snapshots, [PathBuf::from("/tmp/s")]);
}
