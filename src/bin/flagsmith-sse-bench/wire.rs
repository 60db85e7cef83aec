//! Just enough HTTP/1.1 and SSE parsing for a load client: a chunked-transfer decoder and
//! an event parser that pulls `updated_at` out of each `data:` line.

/// Decodes `Transfer-Encoding: chunked`, handing each piece of payload to a callback.
#[derive(Default)]
pub struct Chunked {
    state: ChunkState,
    size: usize,
}

#[derive(Default, Clone, Copy, PartialEq)]
enum ChunkState {
    #[default]
    Size,
    SizeLineEnd,
    Data,
    DataEnd,
    Done,
}

impl Chunked {
    /// Feeds raw body bytes; returns false once the final chunk was seen.
    pub fn feed(&mut self, mut input: &[u8], mut payload: impl FnMut(&[u8])) -> bool {
        while !input.is_empty() {
            match self.state {
                ChunkState::Size => {
                    let b = input[0];
                    input = &input[1..];
                    match b {
                        b'0'..=b'9' => self.size = self.size * 16 + usize::from(b - b'0'),
                        b'a'..=b'f' => self.size = self.size * 16 + usize::from(b - b'a' + 10),
                        b'A'..=b'F' => self.size = self.size * 16 + usize::from(b - b'A' + 10),
                        b'\n' => self.end_size_line(),
                        _ => self.state = ChunkState::SizeLineEnd,
                    }
                }
                ChunkState::SizeLineEnd => {
                    let b = input[0];
                    input = &input[1..];
                    if b == b'\n' {
                        self.end_size_line();
                    }
                }
                ChunkState::Data => {
                    let take = self.size.min(input.len());
                    payload(&input[..take]);
                    input = &input[take..];
                    self.size -= take;
                    if self.size == 0 {
                        self.state = ChunkState::DataEnd;
                    }
                }
                ChunkState::DataEnd => {
                    let b = input[0];
                    input = &input[1..];
                    if b == b'\n' {
                        self.state = ChunkState::Size;
                    }
                }
                ChunkState::Done => return false,
            }
        }
        self.state != ChunkState::Done
    }

    fn end_size_line(&mut self) {
        self.state = if self.size == 0 {
            ChunkState::Done
        } else {
            ChunkState::Data
        };
    }
}

/// Splits an SSE byte stream into lines and reports each `updated_at` in microseconds.
#[derive(Default)]
pub struct Events {
    line: Vec<u8>,
    pub keepalives: u64,
}

impl Events {
    pub fn feed(&mut self, input: &[u8], mut update: impl FnMut(i64)) {
        for &b in input {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            if let Some(micros) = parse_data_line(&self.line) {
                update(micros);
            } else if self.line.first() == Some(&b':') {
                self.keepalives += 1;
            }
            self.line.clear();
        }
    }
}

fn parse_data_line(line: &[u8]) -> Option<i64> {
    let rest = line.strip_prefix(b"data: ")?;
    let text = std::str::from_utf8(rest).ok()?;
    let number = text
        .split("\"updated_at\":")
        .nth(1)?
        .trim()
        .trim_end_matches('}')
        .trim();
    let secs: f64 = number.parse().ok()?;
    Some((secs * 1e6).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_chunks_split_anywhere() {
        let mut body = Vec::new();
        for chunk in [
            &b"event: environment_updated\ndata: {\"updated_at\": 1.5}\n\n"[..],
            b": keepalive\n\n",
        ] {
            body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            body.extend_from_slice(chunk);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        for split in 0..body.len() {
            let mut chunked = Chunked::default();
            let mut events = Events::default();
            let mut got = Vec::new();
            let (a, b) = body.split_at(split);
            let mut open = true;
            for part in [a, b] {
                open = chunked.feed(part, |data| events.feed(data, |m| got.push(m)));
            }
            assert_eq!(got, [1_500_000], "split at {split}");
            assert_eq!(events.keepalives, 1);
            assert!(!open);
        }
    }
}
