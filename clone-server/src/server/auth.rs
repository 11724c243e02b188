//! Bearer-token authentication: the token file and the middleware.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// Routes that need no token.
pub const PUBLIC: &[&str] = &["/v1/health"];

/// Errors setting up the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read or written.
    #[error("token file {path}: {source}; check the directory's permissions or pass --token")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The token file can be read by others.
    #[error("token file {path} has mode {mode:o}; it must be readable by its owner only: run `chmod 600 {path}`")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The token is unusable.
    #[error("the token {what}; use at least 16 printable ASCII characters without spaces")]
    Bad {
        /// What is wrong.
        what: &'static str,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TokenError + '_ {
    move |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Check that a token is usable.
pub fn validate(token: &str) -> Result<(), TokenError> {
    if token.len() < 16 {
        return Err(TokenError::Bad {
            what: "is shorter than 16 characters",
        });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::Bad {
            what: "has spaces or non-ASCII characters",
        });
    }
    Ok(())
}

/// Read the token of `path`, or create the file (mode 0600, its directory 0700) with a new
/// random 256-bit token.
pub fn load_or_create(path: &Path) -> Result<String, TokenError> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let fresh: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(format!("{fresh}\n").as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(io(path))?;
            tracing::info!(path = %path.display(), "generated a new API token");
            Ok(fresh)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mode = std::fs::metadata(path)
                .map_err(io(path))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(TokenError::Permissions {
                    path: path.to_path_buf(),
                    mode,
                });
            }
            let token = std::fs::read_to_string(path).map_err(io(path))?;
            let token = token.trim().to_string();
            validate(&token)?;
            Ok(token)
        }
        Err(e) => Err(io(path)(e)),
    }
}

/// Read the token a running service stored in `path` (for clients such as `kscope lb`).
pub fn read_token(path: &Path) -> Result<String, TokenError> {
    let token = std::fs::read_to_string(path).map_err(io(path))?;
    let token = token.trim().to_string();
    validate(&token)?;
    Ok(token)
}

/// Middleware: every route but [`PUBLIC`] needs `Authorization: Bearer <token>`.
pub async fn require_token(State(token): State<Arc<str>>, req: Request, next: Next) -> Response {
    if PUBLIC.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => ApiError::Unauthorized(
            "this route needs `Authorization: Bearer <token>`; the token is in the service's token file (default ~/.local/state/kscope/token)".into(),
        )
        .into_response(),
        Some(t) if bool::from(t.trim().as_bytes().ct_eq(token.as_bytes())) => next.run(req).await,
        Some(_) => ApiError::Unauthorized(
            "wrong bearer token; use the one in the service's token file (default ~/.local/state/kscope/token)".into(),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_created_private_and_reused() {
        let dir = std::env::temp_dir().join(format!("kscope-token-{}", std::process::id()));
        let path = dir.join("sub/token");
        let t1 = load_or_create(&path).unwrap();
        assert_eq!(t1.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), t1);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(TokenError::Permissions { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(validate("short").is_err());
        assert!(validate("has a space in it, too").is_err());
    }
}
