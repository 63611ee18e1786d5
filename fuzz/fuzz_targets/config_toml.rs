//! Arbitrary text as the node's config file: reading it must return a config or an error
//! naming the problem, never panic, and an accepted config's API keys must parse or be
//! refused with a reason, as the node does at start.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = pipeline::Config::from_toml(text) {
        let _ = cfg.http.keys();
        std::hint::black_box(cfg.engine.shard_count());
    }
});
