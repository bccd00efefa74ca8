//! The host–agent protocol: any bytes as a stream of frames, decoded one after another as the
//! agent and `rvmm run` read them. Whatever decodes must encode to a frame that decodes to the
//! same message (not necessarily the same bytes: bincode also accepts longer varints).
// `cargo test` builds every binary as a test harness, which brings its own `main`.
#![cfg_attr(not(test), no_main)]

use libfuzzer_sys::fuzz_target;
use rvmm_agent::protocol::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok((msg, used)) = decode(rest) {
        assert!(used > 0 && used <= rest.len());
        let frame = encode(&msg).expect("a decoded message encodes");
        let (again, again_used) = decode(&frame).expect("an encoded message decodes");
        assert_eq!(again, msg);
        assert_eq!(again_used, frame.len());
        rest = &rest[used..];
    }
});
