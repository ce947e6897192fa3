//! `tessera openapi`: the OpenAPI 3 document of the public HTTP/JSON API, the same bytes the
//! gateway serves at `/openapi.json`.

/// The document, pretty-printed JSON.
pub fn document() -> anyhow::Result<String> {
    // The body limit plays no part in the document.
    let edge = tessera_gateway::HttpJson::new(&[], usize::MAX)?;
    Ok(String::from_utf8_lossy(&edge.openapi_json()).into_owned())
}
