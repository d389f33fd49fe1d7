//! Line splitting for the output of child processes (container stdout/stderr, a microVM's
//! serial console and QEMU's stderr): one shared reader so every kind cuts lines the same way.

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// The longest line kept; the rest of a longer line is dropped (a runaway line must not grow
/// the agent's memory).
pub(crate) const MAX_LINE: usize = 8 * 1024;

/// Reads `stream` line by line (`\n`, a trailing `\r` dropped, lines cut at [`MAX_LINE`]
/// bytes, invalid UTF-8 replaced) and hands each line to `each`; a last line without a newline
/// is handed over too. Returns at end of stream or on a read error.
pub(crate) async fn read_lines<R, F>(stream: R, mut each: F)
where
    R: AsyncRead + Unpin,
    F: FnMut(String),
{
    let mut reader = BufReader::new(stream);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let (done, used) = match reader.fill_buf().await {
            Ok([]) | Err(_) => (true, 0),
            Ok(buf) => match buf.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    keep(&mut line, &buf[..i]);
                    (false, i + 1)
                }
                None => {
                    keep(&mut line, buf);
                    let len = buf.len();
                    reader.consume(len);
                    continue;
                }
            },
        };
        if done && line.is_empty() {
            return;
        }
        reader.consume(used);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        each(String::from_utf8_lossy(&line).into_owned());
        line.clear();
        if done {
            return;
        }
    }
}

fn keep(line: &mut Vec<u8>, bytes: &[u8]) {
    let room = MAX_LINE.saturating_sub(line.len());
    line.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_split_capped_and_the_last_one_kept() {
        let mut got = Vec::new();
        let long = "x".repeat(MAX_LINE + 100);
        let input = format!("one\r\n\n{long}\nlast without newline");
        read_lines(input.as_bytes(), |text| got.push(text)).await;
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], "one");
        assert_eq!(got[1], "");
        assert_eq!(got[2].len(), MAX_LINE);
        assert_eq!(got[3], "last without newline");
    }
}
