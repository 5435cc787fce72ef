//! The files a scenario's batch load uploads: rows from a dataset (CSV with a header) or
//! from a deterministic generator, padded and poisoned as the scenario asks.

use anyhow::{Result, bail};

use crate::schema::BatchLoad;

/// Files of `n` records each from the dataset, each starting at a different offset so every
/// file has its own content (and so its own document ids), or from the generator; rows are
/// padded to `record_bytes` when given, and every `poison_every`-th row broken.
pub fn make_files(b: &BatchLoad, files: u32) -> Result<Vec<Vec<u8>>> {
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
    let mut out = Vec::new();
    for f in 0..files as usize {
        // Flexible: a poison row has fewer fields than the header.
        let mut w = csv::WriterBuilder::new()
            .flexible(true)
            .from_writer(Vec::new());
        let mut h = header.clone();
        if b.record_bytes.is_some() {
            h.push_field(b"pad");
        }
        w.write_byte_record(&h)?;
        for i in 0..b.records_per_file as usize {
            let mut r = rows[(f * 7919 + i) % rows.len()].clone();
            match b.poison_every.map(|n| n as usize) {
                Some(n) if (i + 1) % n == 0 && (i + 1) / n % 2 == 1 => {
                    r = csv::ByteRecord::from(vec![&r[0]]);
                }
                Some(n) if (i + 1) % n == 0 => {
                    r = r
                        .iter()
                        .enumerate()
                        .map(|(k, v)| if k == number { &b"n/a"[..] } else { v })
                        .collect();
                }
                _ => {}
            }
            if let Some(want) = b.record_bytes {
                // Fields plus their commas and the newline; the pad brings it to `want`.
                let len = r.as_slice().len() + r.len() + 1;
                r.push_field("x".repeat(want.saturating_sub(len)).as_bytes());
            }
            w.write_byte_record(&r)?;
        }
        out.push(w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    Ok(out)
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

/// The files a group's tenants upload: their bytes, the origin the platform derives their
/// document ids from (the first 16 hex digits of the content's SHA-256) and their rows.
pub struct GroupFiles {
    /// Shared, not copied, by every tenant's upload (scale's four tenants upload the same
    /// 18 MB files at once).
    pub bodies: Vec<bytes::Bytes>,
    pub origins: Vec<String>,
    pub records: Vec<u64>,
}

impl GroupFiles {
    pub fn new(bodies: Vec<Vec<u8>>) -> Self {
        use sha2::Digest;
        let origins = bodies
            .iter()
            .map(|b| hex::encode(sha2::Sha256::digest(b))[..16].to_owned())
            .collect();
        let records = bodies
            .iter()
            .map(|b| {
                let mut rdr = csv::ReaderBuilder::new().flexible(true).from_reader(&b[..]);
                rdr.byte_records().count() as u64
            })
            .collect();
        Self {
            bodies: bodies.into_iter().map(bytes::Bytes::from).collect(),
            origins,
            records,
        }
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
    fn files_know_their_origin_and_rows() {
        let f = GroupFiles::new(vec![b"a,b\n1,2\n3\n".to_vec()]);
        assert_eq!(f.records, [2], "a short row is still a row offered");
        assert_eq!(f.origins[0].len(), 16);
    }
}
