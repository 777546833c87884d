//! Config loading: `config::from_yaml` never panics on any text, and a refusal always names at
//! least one problem with a message.
//!
//! Relative paths resolve against a scratch folder holding the fixture JWKS files
//! (`keys/issuer-a.jwks.json`, `keys/issuer-b.jwks.json`) and a `users.yaml`, so seeds that name
//! them reach key and users-file parsing too.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const USERS: &str = "acme:\n  - sub: alice\n    id: u-1\n    roles: [admin]\n  - sub: bob\n    disabled: true\nglobex:\n  - sub: u-77\n";

fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("subguard-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("keys")).expect("scratch folder");
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("scratch file");
        write("keys/issuer-a.jwks.json", include_str!("../../tests/fixtures/keys/issuer-a.jwks.json"));
        write("keys/issuer-b.jwks.json", include_str!("../../tests/fixtures/keys/issuer-b.jwks.json"));
        write("users.yaml", USERS);
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let base = base();
    match subguard::config::from_yaml(text, &base.join("config.yaml"), base) {
        Ok(config) => assert!(!config.tenants.is_empty(), "a config without tenants was accepted"),
        Err(errors) => {
            assert!(!errors.is_empty(), "refused without saying why");
            for e in &errors {
                assert!(!e.message.is_empty(), "an error without a message at {:?}", e.path);
            }
        }
    }
});
