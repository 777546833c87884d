//! A shortcut for users files written in the plain YAML people and generators usually write:
//!
//! ```yaml
//! # comments anywhere
//! acme:
//!   - sub: alice                  # block mappings, items at any one indentation
//!     id: "u-1001"
//!     roles: [admin, billing]
//!   - {sub: bob, roles: []}       # or one flow mapping a line
//!   - sub: carol
//!     roles:
//!       - reader                  # or roles as a block sequence
//! globex: []
//! ```
//!
//! The general YAML reader (serde-saphyr) takes about a second for 100 000 such users; this one
//! takes a few tens of milliseconds, because it knows one shape and nothing else. It is a
//! shortcut, never a second opinion: it reads a file only when every line has that shape and
//! every value is one the general reader would take for the same string, integer or boolean,
//! and it gives up (`None`) on anything else (a tab, a non-ASCII byte, an anchor, a tag, a
//! multi-line value, an escape, a plain scalar that YAML could read as something other than a
//! string, an unknown or repeated key, a missing `sub`), so the general reader reads that file
//! and reports whatever is wrong with it. What this module accepts, the general reader accepts
//! alike, user for user (`the_shortcut_reads_exactly_as_the_general_reader`, and the
//! `users_file` fuzz target compares both on every input).

/// A user as this reader found it, borrowed from the file's text.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct PlainUser<'a> {
    pub sub: &'a str,
    pub id: Option<&'a str>,
    pub roles: Vec<&'a str>,
    pub disabled: bool,
    pub tokens_valid_after: Option<i64>,
}

/// The tenants of the file in file order, each with its users in file order; `None` when the
/// file is not in the shape this reader knows.
pub(super) fn read(text: &str) -> Option<Vec<(&str, Vec<PlainUser<'_>>)>> {
    // Printable ASCII and newlines only: no tabs, no CR, no BOM, no other encoding question.
    if !text.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\n') {
        return None;
    }
    let mut lines = text.split('\n').filter(|l| !blank_or_comment(l)).peekable();
    let mut tenants = Vec::new();
    while let Some(line) = lines.next() {
        let (name, rest) = key(line)?;
        let mut users = Vec::new();
        if end_of_line(rest) {
            // A block sequence of users, or nothing (a null list: no users).
            if let Some(indent) = lines.peek().map(|l| indent_of(l)) {
                while let Some(first) = item(&mut lines, indent) {
                    users.push(user(first, indent + 2, &mut lines)?);
                }
            }
        } else {
            // No users: an empty list, or a null written out.
            let rest = rest.strip_prefix(' ')?.trim_start_matches(' ');
            let (value, rest) = match rest.strip_prefix("[]") {
                Some(rest) => ("[]", rest),
                None => plain_run(rest),
            };
            if !matches!(value, "[]" | "~" | "null" | "Null" | "NULL") || !end_of_line(rest) {
                return None;
            }
        }
        tenants.push((name, users));
    }
    if tenants.is_empty() { None } else { Some(tenants) }
}

type Lines<I> = std::iter::Peekable<I>;

/// The next entry of a block sequence whose dashes sit at column `indent`: what follows its
/// `- `, or `None` (nothing taken) when the next line is something else.
fn item<'a, I: Iterator<Item = &'a str>>(lines: &mut Lines<I>, indent: usize) -> Option<&'a str> {
    let next = *lines.peek()?;
    let entry = next.get(indent..).filter(|_| indent_of(next) == indent)?.strip_prefix("- ")?;
    lines.next();
    Some(entry)
}

/// One user: a flow mapping on its line, or a block mapping whose keys sit at column `col`.
fn user<'a, I: Iterator<Item = &'a str>>(
    first: &'a str,
    col: usize,
    lines: &mut Lines<I>,
) -> Option<PlainUser<'a>> {
    let mut fields = Fields::default();
    if let Some(flow) = first.strip_prefix('{') {
        let rest = flow_mapping(flow, &mut fields)?;
        return end_of_line(rest).then(|| fields.user()).flatten();
    }
    let mut line = first;
    loop {
        let (name, rest) = key(line)?;
        if end_of_line(rest) {
            // Only `roles` may continue on the next lines, as a block sequence at any one
            // indentation from the key's own column on.
            if name != "roles" {
                return None;
            }
            let indent = lines.peek().map(|l| indent_of(l)).filter(|i| *i >= col)?;
            let mut roles = Vec::new();
            while let Some(entry) = item(lines, indent) {
                let (role, rest) = scalar(entry)?;
                if !end_of_line(rest) {
                    return None;
                }
                roles.push(role);
            }
            if roles.is_empty() {
                return None;
            }
            fields.set(name, Value::List(roles))?;
        } else {
            let rest = rest.strip_prefix(' ')?.trim_start_matches(' ');
            let (value, rest) = value(rest)?;
            if !end_of_line(rest) {
                return None;
            }
            fields.set(name, value)?;
        }
        // The next key of this user sits at `col`; anything less indented ends the user, and
        // anything else is a shape this reader does not know.
        match lines.peek().copied() {
            Some(next) if indent_of(next) == col && !next[col..].starts_with('-') => {
                line = &next[col..];
                lines.next();
            }
            Some(next) if indent_of(next) < col => break,
            None => break,
            Some(_) => return None,
        }
    }
    fields.user()
}

/// `{key: value, ...}` after its `{`; returns what follows the `}`.
fn flow_mapping<'a>(mut s: &'a str, fields: &mut Fields<'a>) -> Option<&'a str> {
    loop {
        s = s.trim_start_matches(' ');
        let (name, rest) = key(s)?;
        let rest = rest.strip_prefix(' ')?.trim_start_matches(' ');
        let (value, rest) = value(rest)?;
        fields.set(name, value)?;
        let rest = rest.trim_start_matches(' ');
        if let Some(rest) = rest.strip_prefix(',') {
            s = rest;
        } else {
            return rest.strip_prefix('}');
        }
    }
}

enum Value<'a> {
    Scalar(&'a str, bool),
    List(Vec<&'a str>),
}

/// A value after `key: `: a flow sequence of strings, or a scalar (`true` when it was quoted).
fn value(s: &str) -> Option<(Value<'_>, &str)> {
    if let Some(mut s) = s.strip_prefix('[') {
        let mut list = Vec::new();
        s = s.trim_start_matches(' ');
        if let Some(rest) = s.strip_prefix(']') {
            return Some((Value::List(list), rest));
        }
        loop {
            let (item, rest) = scalar(s)?;
            list.push(item);
            let rest = rest.trim_start_matches(' ');
            if let Some(rest) = rest.strip_prefix(',') {
                s = rest.trim_start_matches(' ');
            } else {
                return Some((Value::List(list), rest.strip_prefix(']')?));
            }
        }
    }
    let quoted = s.starts_with(['"', '\'']);
    let (text, rest) = if quoted { quoted_scalar(s)? } else { plain_run(s) };
    // An empty plain scalar is a null, which only the general reader answers for.
    (quoted || !text.is_empty()).then_some((Value::Scalar(text, quoted), rest))
}

/// A scalar that must read as a string: quoted, or plain and not a word YAML reads otherwise.
fn scalar(s: &str) -> Option<(&str, &str)> {
    if s.starts_with(['"', '\'']) {
        return quoted_scalar(s);
    }
    let (text, rest) = plain_run(s);
    plain_string(text).then_some((text, rest))
}

/// A quoted scalar on one line with nothing to unescape: `"..."` without a backslash, or
/// `'...'` without a doubled quote.
fn quoted_scalar(s: &str) -> Option<(&str, &str)> {
    let quote = s.as_bytes()[0] as char;
    let body = &s[1..];
    let end = body.find(quote)?;
    let (text, rest) = (&body[..end], &body[end + 1..]);
    if (quote == '"' && text.contains('\\')) || (quote == '\'' && rest.starts_with('\'')) {
        return None;
    }
    Some((text, rest))
}

/// The longest run of characters a plain scalar may hold here.
fn plain_run(s: &str) -> (&str, &str) {
    let end = s.bytes().position(|b| !plain_byte(b)).unwrap_or(s.len());
    s.split_at(end)
}

fn plain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b'/' | b'+' | b'|' | b'~')
}

/// A plain scalar the general reader reads as this very string: it starts with a letter (so it
/// is no number, `.inf`, `~` or indicator) and is none of the words YAML 1.1 reads as a boolean
/// or null, in any case.
fn plain_string(text: &str) -> bool {
    const WORDS: [&str; 9] = ["y", "yes", "true", "on", "n", "no", "false", "off", "null"];
    text.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
        && !WORDS.iter().any(|w| text.eq_ignore_ascii_case(w))
}

/// `name:` at the start of `s`: the key (a string scalar) and what follows the colon, which
/// must be a space or the end of the line.
fn key(s: &str) -> Option<(&str, &str)> {
    let (name, rest) = scalar(s)?;
    let rest = rest.strip_prefix(':')?;
    (rest.is_empty() || rest.starts_with(' ')).then_some((name, rest))
}

/// Nothing but spaces and maybe a comment (after at least one space) until the end of the line.
fn end_of_line(rest: &str) -> bool {
    let trimmed = rest.trim_start_matches(' ');
    trimmed.is_empty() || (trimmed.starts_with('#') && trimmed.len() < rest.len())
}

fn blank_or_comment(line: &str) -> bool {
    let trimmed = line.trim_start_matches(' ');
    trimmed.is_empty() || trimmed.starts_with('#')
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// A user's fields as they are read; each may appear once.
#[derive(Default)]
struct Fields<'a> {
    sub: Option<&'a str>,
    id: Option<&'a str>,
    roles: Option<Vec<&'a str>>,
    disabled: Option<bool>,
    tokens_valid_after: Option<i64>,
}

impl<'a> Fields<'a> {
    fn set(&mut self, name: &str, value: Value<'a>) -> Option<()> {
        match (name, value) {
            ("sub", Value::Scalar(s, quoted)) if self.sub.is_none() && (quoted || plain_string(s)) => {
                self.sub = Some(s)
            }
            ("id", Value::Scalar(s, quoted)) if self.id.is_none() && (quoted || plain_string(s)) => {
                self.id = Some(s)
            }
            ("roles", Value::List(roles)) if self.roles.is_none() => self.roles = Some(roles),
            ("disabled", Value::Scalar(s, false)) if self.disabled.is_none() => {
                self.disabled = Some(match s {
                    "true" => true,
                    "false" => false,
                    _ => return None,
                })
            }
            ("tokens_valid_after", Value::Scalar(s, false)) if self.tokens_valid_after.is_none() => {
                self.tokens_valid_after = Some(integer(s)?)
            }
            _ => return None,
        }
        Some(())
    }

    fn user(self) -> Option<PlainUser<'a>> {
        Some(PlainUser {
            sub: self.sub?,
            id: self.id,
            roles: self.roles.unwrap_or_default(),
            disabled: self.disabled.unwrap_or(false),
            tokens_valid_after: self.tokens_valid_after,
        })
    }
}

/// A decimal integer as YAML writes it without doubt: `0`, or an optional `-` and up to 18
/// digits without a leading zero (no `+`, `_`, octal or hex forms, nothing past `i64`).
fn integer(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let plain = s == "0"
        || (!digits.is_empty()
            && digits.len() <= 18
            && !digits.starts_with('0')
            && digits.bytes().all(|b| b.is_ascii_digit()));
    plain.then(|| s.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(text: &str) -> Vec<(&str, Vec<PlainUser<'_>>)> {
        read(text).unwrap_or_else(|| panic!("the shortcut gave up on {text:?}"))
    }

    #[test]
    fn reads_the_common_shapes() {
        let text = "# users\nacme:\n  - sub: alice   # admin\n    id: \"u-1001\"\n    roles: [admin, billing]\n\n  - {sub: bob, roles: []}\n  - sub: carol\n    roles:\n      - reader\n      - 'writer'\n    disabled: true\n    tokens_valid_after: 1767225600\nglobex: []\nempty:\nnulls: ~ # none\nnulled: null\nzero:\n- sub: u-77\n";
        let read = users(text);
        let names: Vec<&str> = read.iter().map(|t| t.0).collect();
        assert_eq!(names, ["acme", "globex", "empty", "nulls", "nulled", "zero"]);
        let acme = &read[0].1;
        assert_eq!(
            acme[0],
            PlainUser {
                sub: "alice",
                id: Some("u-1001"),
                roles: vec!["admin", "billing"],
                ..Default::default()
            }
        );
        assert_eq!(acme[1], PlainUser { sub: "bob", ..Default::default() });
        assert_eq!(
            acme[2],
            PlainUser {
                sub: "carol",
                roles: vec!["reader", "writer"],
                disabled: true,
                tokens_valid_after: Some(1767225600),
                ..Default::default()
            }
        );
        assert!(read[1..5].iter().all(|t| t.1.is_empty()));
        assert_eq!(read[5].1[0].sub, "u-77");
    }

    #[test]
    fn gives_up_on_what_it_does_not_know() {
        for text in [
            "acme:\n\t- sub: a\n",                                              // a tab
            "acme:\r\n  - sub: a\r\n",                                          // CRLF
            "acme:\n  - sub: caf\u{e9}\n",                                      // non-ASCII
            "acme:\n  - sub: yes\n",                                            // a boolean word
            "acme:\n  - sub: NULL\n",                                           // null
            "acme:\n  - sub: 5b7e0a52\n",                                       // starts with a digit
            "acme:\n  - sub: \"a\\tb\"\n",                                      // an escape
            "acme:\n  - sub: 'it''s'\n",                                        // a doubled quote
            "acme:\n  - sub: &a x\n",                                           // an anchor
            "acme:\n  - sub: !!str x\n",                                        // a tag
            "acme:\n  - sub: a b\n",                  // a space inside a plain scalar
            "acme:\n  - sub: a#b\n",                  // not a comment, not a plain byte either
            "acme:\n  - sub: a\n    sub: b\n",        // a repeated key
            "acme:\n  - sub: a\n    extra: 1\n",      // an unknown key
            "acme:\n  - id: a\n",                     // no sub
            "acme:\n  - sub: a\n    roles: admin\n",  // roles not a list
            "acme:\n  - sub: a\n    disabled: yes\n", // a boolean YAML 1.1 spells otherwise
            "acme:\n  - sub: a\n    tokens_valid_after: 017\n", // a leading zero
            "acme:\n  - sub: a\n    tokens_valid_after: 9999999999999999999\n", // past i64
            "acme:\n  - sub: a\n     id: b\n",        // a key at another column
            "acme:\n  - sub: >\n      a\n",           // a block scalar
            "acme:\n  - sub:\n      a\n",             // a multi-line plain scalar
            "acme:\n  - {sub: a,\n     id: b}\n",     // a flow mapping over two lines
            "acme:\n  - sub: a\n   - sub: b\n",       // items at two indentations
            "---\nacme:\n  - sub: a\n",               // a document marker
            "acme: [{sub: a}]\n",                     // a flow list of users
            "acme: nul\n",                            // a string where a list belongs
            "acme: ~x\n",                             // another one
            "{acme: [{sub: a}]}\n",                   // flow style throughout
            "",                                       // nothing at all
        ] {
            assert!(read(text).is_none(), "the shortcut read {text:?}");
        }
    }
}
