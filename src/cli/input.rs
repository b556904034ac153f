//! Reading input files the way the server reads request bodies: JSON or XML documents within a
//! size limit, and NDJSON streamed line by line (a multi-GB export is never held in memory; a
//! line longer than the limit is skipped and reported, the reading goes on).
use std::io::{BufRead, Read};
use std::path::Path;

use serde_json::Value;

use crate::error::{ApiError, Issue};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One resource per line (`$export`).
    Ndjson,
    /// One JSON document (a resource or a Bundle).
    Json,
    /// One XML document.
    Xml,
}

/// NDJSON by extension (`.ndjson`, `.jsonl`), XML by extension or a first `<`, else JSON.
pub fn detect(path: &Path) -> std::io::Result<Format> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.ends_with(".ndjson") || name.ends_with(".jsonl") {
        return Ok(Format::Ndjson);
    }
    if name.ends_with(".xml") {
        return Ok(Format::Xml);
    }
    let mut head = [0u8; 512];
    let n = std::fs::File::open(path)?.read(&mut head)?;
    let first = head[..n]
        .iter()
        .copied()
        .find(|b| !b.is_ascii_whitespace() && *b != 0xEF && *b != 0xBB && *b != 0xBF);
    Ok(if first == Some(b'<') {
        Format::Xml
    } else {
        Format::Json
    })
}

/// The whole of a JSON or XML file, at most `limit` bytes (the server's body limit).
pub fn read_document(path: &Path, limit: usize) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > limit as u64 {
        return Err(format!(
            "the file has {len} bytes; at most {limit} are read as one document (the server's body limit)"
        ));
    }
    let mut out = Vec::with_capacity(len as usize);
    file.take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot read: {e}"))?;
    if out.len() > limit {
        return Err(format!("the file is longer than {limit} bytes"));
    }
    Ok(out)
}

/// A document as the server would take it: XML becomes JSON first (the error the server gives
/// an XML body it cannot read), then the JSON is parsed.
pub fn parse_document(bytes: &[u8], format: Format) -> Result<Value, ApiError> {
    let json;
    let bytes = if format == Format::Xml {
        json = crate::api::xml::xml_to_json(bytes).map_err(|e| {
            ApiError::invalid(vec![Issue::error(
                "structure",
                format!("the body is not a valid FHIR R4 XML resource: {e}"),
                None,
            )])
        })?;
        &json[..]
    } else {
        bytes
    };
    crate::fhir::resource::parse_json(bytes)
}

/// One line of an NDJSON file.
#[derive(Debug)]
pub struct Line {
    /// 1-based line number.
    pub number: u64,
    /// Byte offset just after the line (where reading resumes).
    pub end: u64,
    /// The line without its end of line; `None` when it was longer than the limit.
    pub text: Option<Vec<u8>>,
}

/// Reads NDJSON lines of at most `limit` bytes each.
pub struct Lines<R> {
    reader: R,
    limit: usize,
    number: u64,
    offset: u64,
}

impl<R: BufRead> Lines<R> {
    /// `offset` and `number`: where the reader stands (0, 0 at the start; a resume point).
    pub fn new(reader: R, limit: usize, offset: u64, number: u64) -> Self {
        Lines {
            reader,
            limit,
            number,
            offset,
        }
    }

    /// The next line, or `None` at the end of the input.
    pub fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        let mut buf = Vec::new();
        let mut too_long = false;
        let mut consumed_any = false;
        loop {
            let chunk = self.reader.fill_buf()?;
            if chunk.is_empty() {
                break;
            }
            consumed_any = true;
            let (part, done) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (&chunk[..=i], true),
                None => (chunk, false),
            };
            if !too_long {
                if buf.len() + part.len() > self.limit + 2 {
                    // keep reading to the end of the line, without keeping it
                    too_long = true;
                    buf = Vec::new();
                } else {
                    buf.extend_from_slice(part);
                }
            }
            let n = part.len();
            self.reader.consume(n);
            self.offset += n as u64;
            if done {
                break;
            }
        }
        if !consumed_any {
            return Ok(None);
        }
        self.number += 1;
        while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            buf.pop();
        }
        Ok(Some(Line {
            number: self.number,
            end: self.offset,
            text: (!too_long && buf.len() <= self.limit).then_some(buf),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_skipped_and_offsets_counted() {
        let data = b"{\"a\":1}\r\n0123456789012345\n\n{\"b\":2}";
        let mut lines = Lines::new(std::io::BufReader::with_capacity(4, &data[..]), 10, 0, 0);
        let l = lines.next_line().unwrap().unwrap();
        assert_eq!(
            (l.number, l.end, l.text.as_deref()),
            (1, 9, Some(&b"{\"a\":1}"[..]))
        );
        let l = lines.next_line().unwrap().unwrap();
        assert_eq!((l.number, l.end, l.text), (2, 26, None));
        let l = lines.next_line().unwrap().unwrap();
        assert_eq!((l.number, l.text.as_deref()), (3, Some(&b""[..])));
        let l = lines.next_line().unwrap().unwrap();
        assert_eq!(
            (l.number, l.end, l.text.as_deref()),
            (4, 34, Some(&b"{\"b\":2}"[..]))
        );
        assert!(lines.next_line().unwrap().is_none());
    }
}
