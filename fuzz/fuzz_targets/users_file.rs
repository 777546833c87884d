//! The users file (SPEC §2, `directory.kind: file`): `UsersFile::parse` never panics, what it
//! accepts holds no empty sub and no role that would corrupt the comma-joined roles header, and
//! the plain YAML shortcut reads a file only as the general YAML reader reads it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use subguard::directory::file::UsersFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(fast) = UsersFile::parse_plain_yaml(text) {
        assert_eq!(Ok(fast), UsersFile::parse_yaml_without_shortcut(text), "the shortcut read {text:?} otherwise");
    }
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
