//! `Link` header of paginated listings (`_catalog`, `tags/list`): RFC 8288, only what
//! registries send: `<url>; rel="next"`, possibly among other links.

/// The target of the `rel="next"` link, as written (often relative to the registry root).
pub fn next_link(header: &str) -> Option<String> {
    let mut rest = header;
    loop {
        let open = rest.find('<')?;
        let close = open + rest[open..].find('>')?;
        let target = &rest[open + 1..close];
        // Parameters run up to the next link, which starts after a comma outside quotes.
        let after = &rest[close + 1..];
        let (params, next) = split_params(after);
        if params.split(';').any(|p| is_rel_next(p.trim())) {
            return Some(target.trim().to_string());
        }
        rest = next;
    }
}

fn split_params(s: &str) -> (&str, &str) {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => return (&s[..i], &s[i + 1..]),
            _ => {}
        }
    }
    (s, "")
}

fn is_rel_next(param: &str) -> bool {
    let Some((name, value)) = param.split_once('=') else {
        return false;
    };
    if !name.trim().eq_ignore_ascii_case("rel") {
        return false;
    }
    value
        .trim()
        .trim_matches('"')
        .split_ascii_whitespace()
        .any(|v| v.eq_ignore_ascii_case("next"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_next_link() {
        assert_eq!(
            next_link(r#"</v2/_catalog?last=b&n=2>; rel="next""#).as_deref(),
            Some("/v2/_catalog?last=b&n=2")
        );
        assert_eq!(
            next_link(r#"<https://r.example/v2/a/tags/list?n=1&last=v1>;rel=next"#).as_deref(),
            Some("https://r.example/v2/a/tags/list?n=1&last=v1")
        );
    }

    #[test]
    fn skips_other_relations() {
        assert_eq!(
            next_link(r#"</v2/x?p=1>; rel="prev", </v2/x?p=3>; title="a, b"; rel="last next""#)
                .as_deref(),
            Some("/v2/x?p=3")
        );
        assert_eq!(next_link(r#"</v2/x?p=1>; rel="prev""#), None);
        assert_eq!(next_link(""), None);
        assert_eq!(next_link("<unterminated; rel=next"), None);
    }
}
