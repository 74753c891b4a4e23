//! CORS on an upload route (`cors:` in its config): preflights answered by Stitch, and Stitch's
//! own answers marked for the browser, so that a page on another origin can upload.

use crate::config::{Cors, Route};
use crate::http::{header_str, Reply};
use pingora::http::RequestHeader;

/// Request headers the upload protocols use (a preflight may ask for more; those are allowed
/// too, as the route's protocol decides what to do with them).
const REQUEST_HEADERS: &str = "Content-Type, Authorization, X-Requested-With, Tus-Resumable, \
     Upload-Length, Upload-Offset, Upload-Metadata, Upload-Defer-Length, Upload-Concat, \
     Upload-Checksum, X-HTTP-Method-Override";

/// Response headers a page's script may read.
const EXPOSED_HEADERS: &str = "Location, Tus-Resumable, Tus-Version, Tus-Extension, \
     Tus-Max-Size, Tus-Checksum-Algorithm, Upload-Offset, Upload-Length, Upload-Metadata, \
     Upload-Defer-Length, Upload-Concat, Upload-Expires, Retry-After, Stitch-Delivery, \
     Stitch-Upstream-Status";

/// The request's `Origin`, if the route allows it.
fn allowed_origin<'h>(cors: &Cors, header: &'h RequestHeader) -> Option<&'h str> {
    let origin = header_str(header, http::header::ORIGIN)?;
    cors.origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
        .then_some(origin)
}

/// Is this a CORS preflight (an OPTIONS asking whether a cross-origin request may be sent)?
pub fn is_preflight(header: &RequestHeader) -> bool {
    header.method == http::Method::OPTIONS
        && header.headers.contains_key(http::header::ORIGIN)
        && header
            .headers
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The answer to a preflight: 204 with what the route allows, or 403 for another origin.
pub fn preflight(cors: &Cors, route: &Route, header: &RequestHeader) -> Reply {
    let Some(origin) = allowed_origin(cors, header) else {
        return Reply::refuse(403, "this origin may not upload here (cors.origins)")
            .with_header("vary", "Origin");
    };
    let methods: Vec<&str> = route.methods.iter().map(|m| m.as_str()).collect();
    let asked = header_str(header, http::header::ACCESS_CONTROL_REQUEST_HEADERS)
        .filter(|v| {
            v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_, ".contains(&b))
        })
        .map(|v| format!(", {v}"))
        .unwrap_or_default();
    with_origin(cors, Reply::empty(204), origin)
        .with_header("access-control-allow-methods", &methods.join(", "))
        .with_header(
            "access-control-allow-headers",
            &format!("{REQUEST_HEADERS}{asked}"),
        )
        .with_header(
            "access-control-max-age",
            &cors.max_age.as_secs().to_string(),
        )
}

/// Marks Stitch's answer to a cross-origin request from an allowed origin.
pub fn decorate(route: &Route, header: &RequestHeader, reply: Reply) -> Reply {
    let Some(cors) = &route.cors else {
        return reply;
    };
    match allowed_origin(cors, header) {
        Some(origin) => with_origin(cors, reply, origin)
            .with_header("access-control-expose-headers", EXPOSED_HEADERS),
        None => reply.with_header("vary", "Origin"),
    }
}

fn with_origin(cors: &Cors, reply: Reply, origin: &str) -> Reply {
    let any = cors.origins.iter().any(|o| o == "*") && !cors.credentials;
    let reply = reply
        .with_header(
            "access-control-allow-origin",
            if any { "*" } else { origin },
        )
        .with_header("vary", "Origin");
    if cors.credentials {
        reply.with_header("access-control-allow-credentials", "true")
    } else {
        reply
    }
}
