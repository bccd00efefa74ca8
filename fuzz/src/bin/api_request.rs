//! The API socket's request lines (`rvmm --api-socket`): each input line is served against a
//! VM whose pause and resume succeed or fail by the line's length, so that every reply path
//! runs. Every line must get a reply that is JSON with a boolean `ok`, and never a panic.
// `cargo test` builds every binary as a test harness, which brings its own `main`.
#![cfg_attr(not(test), no_main)]

use libfuzzer_sys::fuzz_target;
use rvmm_vmm::api::{handle_line, RunState, Served, VmControl};

struct Vm {
    state: RunState,
    refuse: bool,
}

impl VmControl for Vm {
    fn state(&self) -> RunState {
        self.state
    }
    fn pause(&mut self) -> Result<(), String> {
        if self.refuse {
            return Err("refused".into());
        }
        self.state = RunState::Paused;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.state = RunState::Running;
        Ok(())
    }
    fn shape(&self) -> (u8, u64) {
        (1, 128)
    }
    // Never touches the file system: a fuzzer must not write snapshots.
    fn snapshot(&mut self, _dir: &std::path::Path) -> Result<(), String> {
        if self.refuse {
            return Err("refused".into());
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut vm = Vm {
        state: RunState::Running,
        refuse: false,
    };
    for line in data.split(|&b| b == b'\n') {
        vm.refuse = line.len() % 3 == 0;
        let (Served::Reply(reply) | Served::Shutdown(reply)) =
            handle_line(&String::from_utf8_lossy(line), &mut vm);
        let value: serde_json::Value = serde_json::from_str(&reply).expect("a JSON reply");
        assert!(value["ok"].is_boolean(), "{reply}");
    }
});
