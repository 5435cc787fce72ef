//! Record sources: a file read incrementally into records, each with its index and line, so
//! a malformed record fails alone and memory stays bounded by one record.

use std::io::{BufRead, Read};

use serde_json::{Map, Value};

use crate::config::Format;

/// One record of a file: its position, its size, and the parsed value or why it failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 0-based among the file's records: the stable part of the document id.
    pub index: u64,
    /// 1-based line where the record starts.
    pub line: u64,
    pub bytes: u64,
    pub value: Result<Value, ParseError>,
}

/// Why a record could not be read: the reason logged for it, after its line where the
/// error has one (`line 3: expected 2 fields, found 3`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{kind}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct ParseError {
    pub line: Option<u64>,
    pub kind: ParseErrorKind,
}

impl ParseError {
    fn at(line: u64, kind: ParseErrorKind) -> Self {
        Self {
            line: Some(line),
            kind,
        }
    }
}

impl From<ParseErrorKind> for ParseError {
    fn from(kind: ParseErrorKind) -> Self {
        Self { line: None, kind }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    /// A CSV header field (1-based) that is not UTF-8.
    #[error("header {0} is not valid UTF-8")]
    HeaderUtf8(usize),
    #[error("unreadable CSV header: {0}")]
    Header(String),
    /// The CSV field under this header is not UTF-8.
    #[error("field `{0}` is not valid UTF-8")]
    FieldUtf8(String),
    #[error("expected {expected} fields, found {found}")]
    FieldCount { expected: u64, found: u64 },
    /// Any other CSV error, in the reader's words.
    #[error("{0}")]
    Csv(String),
    #[error("record exceeds {MAX_RECORD_BYTES} bytes")]
    TooLarge,
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("truncated JSON")]
    Truncated,
    #[error("unexpected data after the JSON value")]
    Trailing,
    #[error("empty file: expected a JSON array or object")]
    Empty,
    #[error("truncated JSON array: missing `]`")]
    UnclosedArray,
    /// A whole file given to an `ingest` app that is not text.
    #[error("file is not valid UTF-8")]
    NotUtf8,
}

/// Longest single record (a CSV row, an NDJSON line, a JSON array element).
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

pub trait RecordSource: Send {
    /// The next record, `None` at the end. IO errors end the file with an error.
    fn next_record(&mut self) -> Option<Result<Record, std::io::Error>>;
}

pub fn open<R: BufRead + Send + 'static>(format: Format, reader: R) -> Box<dyn RecordSource> {
    match format {
        Format::Csv => Box::new(CsvSource::new(reader)),
        Format::Ndjson => Box::new(NdjsonSource {
            reader,
            index: 0,
            line: 0,
            buf: Vec::new(),
        }),
        Format::Json => Box::new(JsonSource::new(reader)),
    }
}

pub struct CsvSource<R: Read> {
    reader: csv::Reader<R>,
    headers: Option<Result<Vec<String>, ParseErrorKind>>,
    record: csv::ByteRecord,
    index: u64,
}

impl<R: Read> CsvSource<R> {
    pub fn new(reader: R) -> Self {
        Self {
            reader: csv::ReaderBuilder::new()
                .has_headers(true)
                .flexible(false)
                .from_reader(reader),
            headers: None,
            record: csv::ByteRecord::new(),
            index: 0,
        }
    }

    fn headers(&mut self) -> Result<Vec<String>, ParseErrorKind> {
        if self.headers.is_none() {
            let h = match self.reader.byte_headers() {
                Ok(h) => h
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let f = if i == 0 {
                            f.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(f)
                        } else {
                            f
                        };
                        std::str::from_utf8(f)
                            .map(str::to_owned)
                            .map_err(|_| ParseErrorKind::HeaderUtf8(i + 1))
                    })
                    .collect(),
                Err(e) => Err(ParseErrorKind::Header(e.to_string())),
            };
            self.headers = Some(h);
        }
        self.headers
            .clone()
            .unwrap_or_else(|| Err(ParseErrorKind::Header("no header".into())))
    }
}

impl<R: Read + Send> RecordSource for CsvSource<R> {
    fn next_record(&mut self) -> Option<Result<Record, std::io::Error>> {
        let headers = match self.headers() {
            Ok(h) => h,
            Err(e) => {
                // A file whose header is unreadable yields one failed record, then ends.
                if self.index > 0 {
                    return None;
                }
                self.index = 1;
                return Some(Ok(Record {
                    index: 0,
                    line: 1,
                    bytes: 0,
                    value: Err(e.into()),
                }));
            }
        };
        let index = self.index;
        match self.reader.read_byte_record(&mut self.record) {
            Ok(false) => None,
            Ok(true) => {
                self.index += 1;
                let line = self.record.position().map_or(0, |p| p.line());
                let bytes = self.record.as_slice().len() as u64 + self.record.len() as u64;
                let mut m = Map::with_capacity(headers.len());
                for (h, f) in headers.iter().zip(self.record.iter()) {
                    match std::str::from_utf8(f) {
                        Ok(s) => {
                            m.insert(h.clone(), Value::String(s.to_owned()));
                        }
                        Err(_) => {
                            return Some(Ok(Record {
                                index,
                                line,
                                bytes,
                                value: Err(ParseError::at(
                                    line,
                                    ParseErrorKind::FieldUtf8(h.clone()),
                                )),
                            }));
                        }
                    }
                }
                Some(Ok(Record {
                    index,
                    line,
                    bytes,
                    value: Ok(Value::Object(m)),
                }))
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                if let csv::ErrorKind::Io(_) = e.kind() {
                    return Some(Err(std::io::Error::other(e.to_string())));
                }
                self.index += 1;
                let kind = match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => ParseErrorKind::FieldCount {
                        expected: *expected_len,
                        found: *len,
                    },
                    _ => ParseErrorKind::Csv(e.to_string()),
                };
                Some(Ok(Record {
                    index,
                    line,
                    bytes: 0,
                    value: Err(ParseError::at(line, kind)),
                }))
            }
        }
    }
}

pub struct NdjsonSource<R> {
    reader: R,
    index: u64,
    line: u64,
    buf: Vec<u8>,
}

impl<R: BufRead + Send> RecordSource for NdjsonSource<R> {
    fn next_record(&mut self) -> Option<Result<Record, std::io::Error>> {
        loop {
            self.buf.clear();
            let n = match (&mut self.reader)
                .take(MAX_RECORD_BYTES as u64 + 1)
                .read_until(b'\n', &mut self.buf)
            {
                Ok(0) => return None,
                Ok(n) => n,
                Err(e) => return Some(Err(e)),
            };
            self.line += 1;
            let line = self.line;
            if n > MAX_RECORD_BYTES && !self.buf.ends_with(b"\n") {
                // Skip the rest of the oversize line without holding it.
                let mut sink = Vec::new();
                loop {
                    sink.clear();
                    match (&mut self.reader)
                        .take(1 << 20)
                        .read_until(b'\n', &mut sink)
                    {
                        Ok(0) => break,
                        Ok(_) if sink.ends_with(b"\n") => break,
                        Ok(_) => continue,
                        Err(e) => return Some(Err(e)),
                    }
                }
                let index = self.index;
                self.index += 1;
                return Some(Ok(Record {
                    index,
                    line,
                    bytes: n as u64,
                    value: Err(ParseError::at(line, ParseErrorKind::TooLarge)),
                }));
            }
            let mut text: &[u8] = &self.buf;
            if line == 1 {
                text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
            }
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let index = self.index;
            self.index += 1;
            let value = serde_json::from_slice::<Value>(text)
                .map_err(|e| ParseError::at(line, ParseErrorKind::Json(e.to_string())));
            return Some(Ok(Record {
                index,
                line,
                bytes: n as u64,
                value,
            }));
        }
    }
}

/// A JSON array read element by element (or a single JSON object as one record).
pub struct JsonSource<R> {
    reader: R,
    state: JsonState,
    index: u64,
    line: u64,
    buf: Vec<u8>,
}

#[derive(Debug, PartialEq)]
enum JsonState {
    Start,
    InArray,
    Done,
}

impl<R: BufRead> JsonSource<R> {
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            state: JsonState::Start,
            index: 0,
            line: 1,
            buf: Vec::new(),
        }
    }

    fn peek(&mut self) -> std::io::Result<Option<u8>> {
        Ok(self.reader.fill_buf()?.first().copied())
    }

    fn bump(&mut self) -> std::io::Result<Option<u8>> {
        let b = self.peek()?;
        if let Some(c) = b {
            self.reader.consume(1);
            if c == b'\n' {
                self.line += 1;
            }
        }
        Ok(b)
    }

    fn skip_ws(&mut self) -> std::io::Result<Option<u8>> {
        loop {
            match self.peek()? {
                Some(c) if c.is_ascii_whitespace() => {
                    self.bump()?;
                }
                other => return Ok(other),
            }
        }
    }

    /// Reads one JSON value's bytes into `buf`, stopping before a top-level `,` or `]`.
    fn read_element(&mut self) -> std::io::Result<Result<(), ParseErrorKind>> {
        self.buf.clear();
        let (mut depth, mut in_str, mut esc) = (0i32, false, false);
        loop {
            let Some(c) = self.peek()? else {
                return Ok(if depth == 0 && !in_str && !self.buf.is_empty() {
                    Ok(())
                } else {
                    Err(ParseErrorKind::Truncated)
                });
            };
            if !in_str && depth == 0 && (c == b',' || c == b']') {
                return Ok(Ok(()));
            }
            self.bump()?;
            if self.buf.len() >= MAX_RECORD_BYTES {
                return Ok(Err(ParseErrorKind::TooLarge));
            }
            self.buf.push(c);
            if in_str {
                match (esc, c) {
                    (true, _) => esc = false,
                    (false, b'\\') => esc = true,
                    (false, b'"') => in_str = false,
                    _ => {}
                }
            } else {
                match c {
                    b'"' => in_str = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => depth -= 1,
                    _ => {}
                }
            }
        }
    }
}

impl<R: BufRead + Send> RecordSource for JsonSource<R> {
    fn next_record(&mut self) -> Option<Result<Record, std::io::Error>> {
        let io = |r: std::io::Result<_>| r;
        loop {
            match self.state {
                JsonState::Done => return None,
                JsonState::Start => {
                    if let Ok(b) = self.reader.fill_buf()
                        && b.starts_with(b"\xEF\xBB\xBF")
                    {
                        self.reader.consume(3);
                    }
                    match io(self.skip_ws()) {
                        Err(e) => return Some(Err(e)),
                        Ok(None) => {
                            self.state = JsonState::Done;
                            return Some(Ok(self.failed(0, ParseErrorKind::Empty)));
                        }
                        Ok(Some(b'[')) => {
                            let _ = self.bump();
                            self.state = JsonState::InArray;
                        }
                        Ok(Some(_)) => {
                            // A single value: the whole file is one record.
                            let line = self.line;
                            let r = match self.read_element() {
                                Err(e) => return Some(Err(e)),
                                Ok(r) => r,
                            };
                            self.state = JsonState::Done;
                            let bytes = self.buf.len() as u64;
                            let value = r.and_then(|()| {
                                serde_json::from_slice::<Value>(&self.buf)
                                    .map_err(|e| ParseErrorKind::Json(e.to_string()))
                            });
                            let trailing = match self.skip_ws() {
                                Ok(Some(_)) => true,
                                Ok(None) => false,
                                Err(e) => return Some(Err(e)),
                            };
                            let value = match value {
                                Ok(_) if trailing => Err(ParseErrorKind::Trailing),
                                v => v,
                            };
                            self.index += 1;
                            return Some(Ok(Record {
                                index: 0,
                                line,
                                bytes,
                                value: value.map_err(|e| ParseError::at(line, e)),
                            }));
                        }
                    }
                }
                JsonState::InArray => {
                    match self.skip_ws() {
                        Err(e) => return Some(Err(e)),
                        Ok(None) => {
                            self.state = JsonState::Done;
                            let i = self.index;
                            return Some(Ok(self.failed(i, ParseErrorKind::UnclosedArray)));
                        }
                        Ok(Some(b']')) => {
                            self.state = JsonState::Done;
                            return None;
                        }
                        Ok(Some(b',')) if self.index > 0 => {
                            let _ = self.bump();
                            continue;
                        }
                        Ok(Some(_)) => {}
                    }
                    let line = self.line;
                    let r = match self.read_element() {
                        Err(e) => return Some(Err(e)),
                        Ok(r) => r,
                    };
                    let index = self.index;
                    self.index += 1;
                    let bytes = self.buf.len() as u64;
                    let value = match r {
                        Err(e) => {
                            // Structure is lost: nothing after this point can be trusted.
                            self.state = JsonState::Done;
                            Err(e)
                        }
                        Ok(()) => serde_json::from_slice::<Value>(&self.buf)
                            .map_err(|e| ParseErrorKind::Json(e.to_string())),
                    };
                    return Some(Ok(Record {
                        index,
                        line,
                        bytes,
                        value: value.map_err(|e| ParseError::at(line, e)),
                    }));
                }
            }
        }
    }
}

impl<R> JsonSource<R> {
    fn failed(&mut self, index: u64, kind: ParseErrorKind) -> Record {
        self.index = index + 1;
        Record {
            index,
            line: self.line,
            bytes: 0,
            value: Err(ParseError::at(self.line, kind)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(format: Format, text: &str) -> Vec<Record> {
        let mut src = open(format, std::io::Cursor::new(text.as_bytes().to_vec()));
        std::iter::from_fn(|| src.next_record())
            .map(|r| r.expect("no io error"))
            .collect()
    }

    #[test]
    fn csv_with_quotes_dotted_headers_and_a_bad_row() {
        let recs = all(
            Format::Csv,
            "\u{feff}a.b,c\n\"x, y\",1\nonly-one\n\"q\"\"uote\",\n",
        );
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].value.as_ref().expect("ok")["a.b"], "x, y");
        assert_eq!(recs[1].index, 1);
        let err = recs[1].value.as_ref().expect_err("bad row");
        assert_eq!(
            err,
            &ParseError::at(
                3,
                ParseErrorKind::FieldCount {
                    expected: 2,
                    found: 1
                }
            )
        );
        assert_eq!(err.to_string(), "line 3: expected 2 fields, found 1");
        assert_eq!(recs[2].value.as_ref().expect("ok")["a.b"], "q\"uote");
    }

    #[test]
    fn csv_invalid_utf8_fails_only_that_row() {
        let mut bytes = b"a\nok\n".to_vec();
        bytes.extend_from_slice(b"\xff\xfe\nfine\n");
        let mut src = open(Format::Csv, std::io::Cursor::new(bytes));
        let recs: Vec<_> = std::iter::from_fn(|| src.next_record())
            .map(|r| r.expect("io"))
            .collect();
        assert_eq!(recs.len(), 3);
        assert!(
            recs[1]
                .value
                .as_ref()
                .expect_err("bad")
                .to_string()
                .contains("UTF-8")
        );
        assert!(recs[2].value.is_ok());
    }

    #[test]
    fn ndjson_skips_blank_lines_and_fails_bad_ones() {
        let recs = all(Format::Ndjson, "{\"a\":1}\n\n{bad\n{\"a\":2}");
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[1].line, 3);
        assert!(
            recs[1]
                .value
                .as_ref()
                .expect_err("bad")
                .to_string()
                .starts_with("line 3: invalid JSON")
        );
        assert_eq!(recs[2].value.as_ref().expect("ok")["a"], 2);
        assert_eq!(recs[2].index, 2);
    }

    #[test]
    fn json_arrays_stream_element_by_element() {
        let recs = all(
            Format::Json,
            " [ {\"a\": \"],[\"},\n {\"b\": [1,2]} ,\n{x} ]",
        );
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].value.as_ref().expect("ok")["a"], "],[");
        assert_eq!(recs[1].value.as_ref().expect("ok")["b"][1], 2);
        assert!(recs[2].value.is_err());
        assert_eq!(recs[2].line, 3);
    }

    #[test]
    fn json_single_object_truncated_and_empty() {
        assert_eq!(all(Format::Json, "{\"a\":1}").len(), 1);
        let t = all(Format::Json, "[{\"a\":1},{\"b\":");
        assert_eq!(t.len(), 2);
        assert!(
            t[1].value
                .as_ref()
                .expect_err("truncated")
                .to_string()
                .contains("truncated")
        );
        let e = all(Format::Json, "");
        assert!(
            e[0].value
                .as_ref()
                .expect_err("empty")
                .to_string()
                .contains("empty file")
        );
        assert!(all(Format::Json, "[]").is_empty());
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e12f64..1e12).prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z.]{1,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn drain(format: Format, bytes: Vec<u8>) -> Vec<Record> {
        let mut src = open(format, std::io::Cursor::new(bytes));
        std::iter::from_fn(|| src.next_record())
            .map(|r| r.expect("in-memory reads do not fail"))
            .collect()
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_records_are_numbered_in_order(
            bytes in prop::collection::vec(any::<u8>(), 0..4096),
            format in prop_oneof![Just(Format::Csv), Just(Format::Json), Just(Format::Ndjson)],
        ) {
            let recs = drain(format, bytes);
            for (i, r) in recs.iter().enumerate() {
                prop_assert_eq!(r.index, i as u64);
                if let Err(e) = &r.value {
                    let e = e.to_string();
                    prop_assert!(e.starts_with("line ") || e.starts_with("unreadable") || e.starts_with("header"), "{}", e);
                }
            }
        }

        #[test]
        fn json_arrays_and_ndjson_yield_exactly_the_values_written(values in prop::collection::vec(json(), 0..12)) {
            let array = serde_json::to_vec_pretty(&Value::Array(values.clone())).expect("json");
            let got: Vec<Value> = drain(Format::Json, array).into_iter().map(|r| r.value.expect("valid")).collect();
            prop_assert_eq!(&got, &values);
            let lines: Vec<u8> = values.iter().flat_map(|v| { let mut l = serde_json::to_vec(v).expect("json"); l.push(b'\n'); l }).collect();
            let got: Vec<Value> = drain(Format::Ndjson, lines).into_iter().map(|r| r.value.expect("valid")).collect();
            prop_assert_eq!(&got, &values);
        }

        #[test]
        fn csv_yields_every_row_written(rows in prop::collection::vec(prop::collection::vec("[^\r\n]{0,10}", 3), 0..20)) {
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record(["a", "b.c", "d"]).expect("header");
            for r in &rows { w.write_record(r).expect("row"); }
            let bytes = w.into_inner().expect("flush");
            let recs = drain(Format::Csv, bytes);
            let expected: Vec<_> = rows.iter().collect();
            prop_assert_eq!(recs.len(), expected.len());
            for (rec, row) in recs.iter().zip(expected) {
                let v = rec.value.as_ref().expect("valid row");
                prop_assert_eq!(v["b.c"].as_str(), Some(row[1].as_str()));
            }
        }
    }
}
