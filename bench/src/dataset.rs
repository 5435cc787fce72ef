//! The files a scenario's batch load uploads: rows from a dataset (CSV with a header) or
//! from a deterministic generator, padded and poisoned as the scenario asks.

use anyhow::{Result, bail};

use crate::schema::BatchLoad;

/// Files of `n` records each from the dataset, each starting at a different offset so every
/// file has its own content (and so its own document ids), or from the generator; rows are
/// padded to `record_bytes` when given, and every `poison_every`-th row broken.
pub fn make_files(b: &BatchLoad, files: u32) -> Result<Vec<Vec<u8>>> {
    let g = Generator::new(b)?;
    (0..files as usize).map(|f| g.file(f)).collect()
}

/// Rows a streamed upload's chunk holds.
const CHUNK_ROWS: usize = 1000;

/// A scenario's files, made on demand: the same bytes every time, any part of any file,
/// without holding the files (scale's five 18 MB files, uploaded by each of its four
/// tenants, were 86 MiB of the runner for the whole run).
pub struct Generator {
    header: csv::ByteRecord,
    rows: Vec<csv::ByteRecord>,
    /// The field a poison row breaks.
    number: usize,
    records: usize,
    record_bytes: Option<usize>,
    poison_every: Option<u32>,
}

impl Generator {
    pub fn new(b: &BatchLoad) -> Result<Self> {
        let (header, rows) = match &b.dataset {
            Some(path) => {
                let text = std::fs::read(path)?;
                let mut rdr = csv::ReaderBuilder::new().from_reader(&text[..]);
                let header = rdr.byte_headers()?.clone();
                let rows: Vec<csv::ByteRecord> =
                    rdr.byte_records().collect::<std::result::Result<_, _>>()?;
                (header, rows)
            }
            None => generated(10_007),
        };
        if rows.is_empty() {
            bail!("dataset has no rows");
        }
        // The number a poison row breaks: `result` (the water-quality data), `value`, else the last.
        let number = header
            .iter()
            .position(|h| h == b"result" || h == b"value")
            .unwrap_or(header.len().saturating_sub(1));
        Ok(Self {
            header,
            rows,
            number,
            records: b.records_per_file as usize,
            record_bytes: b.record_bytes,
            poison_every: b.poison_every,
        })
    }

    /// File `f` whole.
    pub fn file(&self, f: usize) -> Result<Vec<u8>> {
        self.chunk(f, 0, self.records)
    }

    /// Rows `from..to` of file `f` as CSV, the header first when `from` is 0: the chunks of
    /// a file, in order, are the file.
    pub fn chunk(&self, f: usize, from: usize, to: usize) -> Result<Vec<u8>> {
        // Flexible: a poison row has fewer fields than the header.
        let mut w = csv::WriterBuilder::new()
            .flexible(true)
            .from_writer(Vec::new());
        if from == 0 {
            let mut h = self.header.clone();
            if self.record_bytes.is_some() {
                h.push_field(b"pad");
            }
            w.write_byte_record(&h)?;
        }
        for i in from..to.min(self.records) {
            w.write_byte_record(&self.row(f, i))?;
        }
        w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Row `i` of file `f`.
    fn row(&self, f: usize, i: usize) -> csv::ByteRecord {
        let mut r = self.rows[(f * 7919 + i) % self.rows.len()].clone();
        match self.poison_every.map(|n| n as usize) {
            Some(n) if (i + 1) % n == 0 && (i + 1) / n % 2 == 1 => {
                r = csv::ByteRecord::from(vec![&r[0]]);
            }
            Some(n) if (i + 1) % n == 0 => {
                r = r
                    .iter()
                    .enumerate()
                    .map(|(k, v)| if k == self.number { &b"n/a"[..] } else { v })
                    .collect();
            }
            _ => {}
        }
        if let Some(want) = self.record_bytes {
            // Fields plus their commas and the newline; the pad brings it to `want`.
            let len = r.as_slice().len() + r.len() + 1;
            r.push_field("x".repeat(want.saturating_sub(len)).as_bytes());
        }
        r
    }

    /// The first rows of a file's chunks of [`CHUNK_ROWS`] rows (one chunk, the header, for
    /// a file of no rows).
    fn chunk_starts(&self) -> impl Iterator<Item = usize> + Send + use<> {
        (0..self.records.max(1)).step_by(CHUNK_ROWS)
    }

    /// File `f` in chunks of [`CHUNK_ROWS`] rows, each made when it is asked for.
    pub fn chunks(&self, f: usize) -> impl Iterator<Item = Result<Vec<u8>>> + '_ {
        self.chunk_starts()
            .map(move |from| self.chunk(f, from, from + CHUNK_ROWS))
    }
}

/// `n` deterministic readings: the same on every run and machine.
fn generated(n: usize) -> (csv::ByteRecord, Vec<csv::ByteRecord>) {
    let header = csv::ByteRecord::from(vec!["id", "site", "time", "value"]);
    let rows = (0..n)
        .map(|i| {
            let x = (i as u64).wrapping_mul(2_654_435_761) % 100_000;
            csv::ByteRecord::from(vec![
                i.to_string(),
                format!("S{:03}", i % 97),
                format!(
                    "2026-01-01T{:02}:{:02}:{:02}Z",
                    i / 3600 % 24,
                    i / 60 % 60,
                    i % 60
                ),
                format!("{}.{:02}", x / 100, x % 100),
            ])
        })
        .collect();
    (header, rows)
}

/// The files a group's tenants upload: made as each upload sends them, with the origin the
/// platform derives their document ids from (the first 16 hex digits of the content's
/// SHA-256) and their rows.
pub struct GroupFiles {
    generator: std::sync::Arc<Generator>,
    pub origins: Vec<String>,
    pub records: Vec<u64>,
}

impl GroupFiles {
    /// `files` files of `b`: each made once here, for its origin, and not kept.
    pub fn new(b: &BatchLoad, files: u32) -> Result<Self> {
        use sha2::Digest;
        let generator = Generator::new(b)?;
        let mut origins = Vec::new();
        for f in 0..files as usize {
            let mut h = sha2::Sha256::new();
            for c in generator.chunks(f) {
                h.update(c?);
            }
            origins.push(hex::encode(h.finalize())[..16].to_owned());
        }
        Ok(Self {
            generator: std::sync::Arc::new(generator),
            origins,
            records: vec![u64::from(b.records_per_file); files as usize],
        })
    }

    pub fn len(&self) -> usize {
        self.origins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// File `i` as an upload body: its chunks made as the upload sends them.
    pub fn body(&self, i: usize) -> reqwest::Body {
        let g = self.generator.clone();
        let chunks = g.chunk_starts().map(move |from| {
            g.chunk(i, from, from + CHUNK_ROWS)
                .map(bytes::Bytes::from)
                .map_err(std::io::Error::other)
        });
        reqwest::Body::wrap_stream(futures::stream::iter(chunks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_and_padded_files_are_deterministic_and_sized() {
        let b = BatchLoad {
            files: 2,
            records_per_file: 50,
            record_bytes: Some(1000),
            dataset: None,
            poison_every: None,
        };
        let a = make_files(&b, 2).expect("files");
        assert_eq!(
            a,
            make_files(&b, 2).expect("again"),
            "same bytes every time"
        );
        assert_ne!(a[0], a[1], "each file has its own records");
        let mut rdr = csv::Reader::from_reader(&a[0][..]);
        assert_eq!(
            rdr.headers().expect("header"),
            vec!["id", "site", "time", "value", "pad"]
        );
        let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.expect("row")).collect();
        assert_eq!(rows.len(), 50);
        for r in &rows {
            // Field bytes, the commas between the fields, the newline.
            let len = r.as_slice().len() + (r.len() - 1) + 1;
            assert_eq!(len, 1000, "{r:?}");
        }
    }

    #[test]
    fn poison_rows_alternate_between_unparseable_and_not_a_number() {
        let b = BatchLoad {
            files: 1,
            records_per_file: 20,
            record_bytes: None,
            dataset: None,
            poison_every: Some(5),
        };
        let f = make_files(&b, 1).expect("files");
        let mut rdr = csv::ReaderBuilder::new()
            .flexible(true)
            .from_reader(&f[0][..]);
        let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.expect("row")).collect();
        assert_eq!(rows.len(), 20, "poison rows are rows offered too");
        let short: Vec<usize> = (0..20).filter(|&i| rows[i].len() < 4).collect();
        let nan: Vec<usize> = (0..20)
            .filter(|&i| rows[i].get(3).unwrap_or("") == "n/a")
            .collect();
        assert_eq!(short, [4, 14]);
        assert_eq!(nan, [9, 19]);
    }

    #[test]
    fn chunks_make_the_file_and_its_origin() {
        use sha2::Digest;
        let b = BatchLoad {
            files: 2,
            records_per_file: 2_500,
            record_bytes: None,
            dataset: None,
            poison_every: Some(7),
        };
        let g = Generator::new(&b).expect("generator");
        let whole = g.file(1).expect("file");
        let chunks: Vec<Vec<u8>> = g.chunks(1).collect::<Result<_>>().expect("chunks");
        assert_eq!(chunks.len(), 3, "2,500 rows in chunks of 1,000");
        assert_eq!(chunks.concat(), whole, "the chunks in order are the file");
        let f = GroupFiles::new(&b, 2).expect("files");
        assert_eq!(
            f.records,
            [2_500, 2_500],
            "poison rows are rows offered too"
        );
        let sha = hex::encode(sha2::Sha256::digest(&whole));
        assert_eq!(f.origins[1], sha[..16], "the origin is the content's");
        assert_ne!(f.origins[0], f.origins[1]);
    }
}
