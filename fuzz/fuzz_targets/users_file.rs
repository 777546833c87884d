//! The users file (SPEC §2, `directory.kind: file`): `UsersFile::parse` never panics, and what it
//! accepts holds no empty sub and no role that would corrupt the comma-joined roles header.

#![no_main]

use libfuzzer_sys::fuzz_target;
use subguard::directory::file::UsersFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match UsersFile::parse(text) {
        Ok(users) => {
            for (tenant, by_sub) in &users.tenants {
                for (sub, user) in by_sub {
                    assert!(!sub.is_empty(), "an empty sub was accepted in {tenant}");
                    if let Some(roles) = &user.roles {
                        assert!(
                            roles.split(',').all(|r| !r.is_empty()),
                            "roles {roles:?} hold an empty role"
                        );
                    }
                }
            }
        }
        Err(errors) => assert!(!errors.is_empty(), "refused without saying why"),
    }
});
