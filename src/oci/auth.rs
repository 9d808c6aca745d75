//! Registry authentication: `WWW-Authenticate` challenges (Basic and Bearer), credentials and
//! the bearer-token cache.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use base64::Engine;

/// A user name and password for a registry. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// One authentication challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lower-cased scheme: `basic`, `bearer`, …
    pub scheme: String,
    /// Parameters with lower-cased names.
    pub params: HashMap<String, String>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// Parses a `WWW-Authenticate` value (RFC 7235): one or more challenges, each a scheme
/// followed by comma-separated `name=value` or `name="quoted value"` parameters. Quoted
/// values may hold commas (`scope="repository:a:pull,push"`) and backslash escapes.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let bytes = header.as_bytes();
    let mut i = 0;
    let skip = |i: &mut usize, pred: &dyn Fn(u8) -> bool| {
        while *i < bytes.len() && pred(bytes[*i]) {
            *i += 1;
        }
    };
    let is_token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b);
    while i < bytes.len() {
        skip(&mut i, &|b| b == b' ' || b == b'\t' || b == b',');
        let start = i;
        skip(&mut i, &is_token);
        if start == i {
            // Not a token: skip the stray character and go on.
            i += 1;
            continue;
        }
        let word = &header[start..i];
        let after_ws = {
            let mut j = i;
            skip(&mut j, &|b| b == b' ' || b == b'\t');
            j
        };
        let is_param = after_ws < bytes.len()
            && bytes[after_ws] == b'='
            && !out.is_empty()
            // `token68` (e.g. `Negotiate abc==`) ends in '='; a parameter has a value after it.
            && !(after_ws + 1 >= bytes.len() || bytes[after_ws + 1] == b',' || bytes[after_ws + 1] == b'=');
        if !is_param {
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: HashMap::new(),
            });
            continue;
        }
        i = after_ws + 1;
        skip(&mut i, &|b| b == b' ' || b == b'\t');
        let value = if i < bytes.len() && bytes[i] == b'"' {
            i += 1;
            let mut value = String::new();
            while i < bytes.len() && bytes[i] != b'"' {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                // Push whole UTF-8 characters, not bytes.
                let ch_len = header[i..].chars().next().map_or(1, char::len_utf8);
                value.push_str(&header[i..i + ch_len]);
                i += ch_len;
            }
            i += 1; // closing quote
            value
        } else {
            // Unquoted: up to the next separator (lenient: realms are often bare URLs).
            let vstart = i;
            skip(&mut i, &|b| b != b',' && b != b' ' && b != b'\t');
            header[vstart..i].to_string()
        };
        if let Some(last) = out.last_mut() {
            last.params.insert(word.to_ascii_lowercase(), value);
        }
    }
    out
}

/// A bearer token and when to stop using it.
#[derive(Clone)]
struct CachedToken {
    token: String,
    expires: Instant,
}

/// How a registry wants to be authenticated, learnt from its challenges, and the tokens it
/// has handed out, keyed by scope.
#[derive(Default)]
pub struct AuthState {
    /// The registry answered with a Basic challenge: send credentials up front from now on.
    pub basic: bool,
    /// The registry's token service (realm, service), from a Bearer challenge.
    pub bearer: Option<(String, Option<String>)>,
    tokens: HashMap<String, CachedToken>,
}

impl AuthState {
    pub fn token(&self, scope: &str) -> Option<String> {
        self.tokens
            .get(scope)
            .filter(|t| t.expires > Instant::now())
            .map(|t| t.token.clone())
    }

    /// Keeps a token for `scope`; it is dropped a little before the registry would.
    pub fn store_token(&mut self, scope: &str, token: String, expires_in: Option<u64>) {
        // The distribution spec says 60 s when the token service does not say.
        let lifetime = Duration::from_secs(expires_in.unwrap_or(60).max(10));
        let margin = Duration::from_secs(5).min(lifetime / 4);
        self.tokens.insert(
            scope.to_string(),
            CachedToken {
                token,
                expires: Instant::now() + lifetime - margin,
            },
        );
    }
}

/// Body of a token service answer: `token` (Docker) or `access_token` (OAuth2).
#[derive(Debug, serde::Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    pub fn into_token(self) -> Option<(String, Option<u64>)> {
        let expires = self.expires_in;
        self.token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))
            .map(|t| (t, expires))
    }
}

/// Asks a token service (`realm`, from a Bearer challenge) for a token covering the
/// space-separated `scope`, with Basic `credentials` when there are any. The error says what
/// the service answered, never the credentials.
pub async fn request_token(
    http: &reqwest::Client,
    mut realm: reqwest::Url,
    service: Option<&str>,
    scope: &str,
    credentials: Option<&Credentials>,
) -> Result<(String, Option<u64>), TokenError> {
    let shown = realm.to_string();
    {
        let mut query = realm.query_pairs_mut();
        if let Some(service) = service {
            query.append_pair("service", service);
        }
        for s in scope.split(' ').filter(|s| !s.is_empty()) {
            query.append_pair("scope", s);
        }
    }
    let mut request = http.get(realm);
    if let Some(creds) = credentials {
        request = request.header(reqwest::header::AUTHORIZATION, creds.basic_header());
    }
    let failed = |reason: String| TokenError {
        status: None,
        message: format!("token service {shown}: {reason}"),
    };
    let mut resp = request.send().await.map_err(|e| failed(e.to_string()))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(TokenError {
            status: Some(status.as_u16()),
            message: format!("token service {shown}: HTTP {}", status.as_u16()),
        });
    }
    const LIMIT: usize = 1024 * 1024;
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| failed(e.to_string()))? {
        if body.len() + chunk.len() > LIMIT {
            return Err(failed(format!("answer larger than {LIMIT} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    let parsed: TokenResponse =
        serde_json::from_slice(&body).map_err(|e| failed(format!("bad answer: {e}")))?;
    parsed
        .into_token()
        .ok_or_else(|| failed("no token in answer".into()))
}

/// Why [`request_token`] failed: the service's HTTP status when it answered one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError {
    pub status: Option<u16>,
    pub message: String,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TokenError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge_with_commas_in_scope() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:team/app:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.example.com/token"));
        assert_eq!(c[0].param("service"), Some("registry.example.com"));
        assert_eq!(c[0].param("scope"), Some("repository:team/app:pull,push"));
    }

    #[test]
    fn parses_basic_and_case_insensitive_names() {
        let c = parse_challenges(r#"Basic Realm="Registry Realm""#);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("Registry Realm"));
    }

    #[test]
    fn parses_several_challenges_unquoted_values_and_escapes() {
        let c = parse_challenges(
            r#"Basic realm="a \"quoted\" realm", Bearer realm=https://t.example/token, service=reg , error="insufficient_scope""#,
        );
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].param("realm"), Some(r#"a "quoted" realm"#));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("realm"), Some("https://t.example/token"));
        assert_eq!(c[1].param("service"), Some("reg"));
        assert_eq!(c[1].param("error"), Some("insufficient_scope"));
    }

    #[test]
    fn tolerates_garbage() {
        assert!(parse_challenges("").is_empty());
        let c = parse_challenges(r#"Bearer realm="unterminated"#);
        assert_eq!(c[0].param("realm"), Some("unterminated"));
        let c = parse_challenges("Negotiate abc==");
        assert_eq!(c[0].scheme, "negotiate");
        assert!(
            parse_challenges("=,=\"")
                .iter()
                .all(|c| c.params.is_empty())
        );
    }

    #[test]
    fn credentials_debug_hides_password() {
        let c = Credentials {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.basic_header(), "Basic dTpodW50ZXIy");
    }

    #[test]
    fn token_cache_expires() {
        let mut state = AuthState::default();
        state.store_token("repository:a:pull", "t1".into(), Some(300));
        assert_eq!(state.token("repository:a:pull").as_deref(), Some("t1"));
        assert_eq!(state.token("repository:b:pull"), None);
        let resp: TokenResponse =
            serde_json::from_str(r#"{"access_token":"x","expires_in":30}"#).unwrap();
        assert_eq!(resp.into_token(), Some(("x".into(), Some(30))));
        let resp: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert_eq!(resp.into_token(), None);
    }
}
