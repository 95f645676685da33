//! A DNS client just big enough for the tests: one A query over UDP and
//! the addresses in the answer. No resolver library: what the tests check
//! is the server's answer itself, with nothing cached or reordered.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};

/// Asks `server` for the A records of `name`; an empty list when it has
/// none (NXDOMAIN or no answer).
pub async fn a_records(server: SocketAddr, name: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let mut query = Vec::with_capacity(64);
    query.extend_from_slice(&id.to_be_bytes());
    query.extend_from_slice(&[0x01, 0x00]); // recursion desired
    query.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len()).context("label too long")?;
        query.push(len);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    socket.connect(server).await?;
    socket.send(&query).await?;
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
        .await
        .context("no DNS answer within 2 s")??;
    parse(&buf[..n], id)
}

fn parse(msg: &[u8], id: u16) -> anyhow::Result<Vec<Ipv4Addr>> {
    let get = |at: usize, len: usize| msg.get(at..at + len).context("truncated DNS answer");
    let u16_at = |at: usize| -> anyhow::Result<u16> {
        let b = get(at, 2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    };
    if u16_at(0)? != id {
        bail!("DNS answer for another query");
    }
    let (questions, answers) = (u16_at(4)?, u16_at(6)?);
    // A name: labels up to a zero, or a two-byte pointer.
    let skip_name = |mut at: usize| -> anyhow::Result<usize> {
        loop {
            let len = *get(at, 1)?.first().context("name")?;
            match len {
                0 => return Ok(at + 1),
                l if l & 0xc0 == 0xc0 => return Ok(at + 2),
                l => at += 1 + usize::from(l),
            }
        }
    };
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(at)? + 4;
    }
    let mut found = Vec::new();
    for _ in 0..answers {
        at = skip_name(at)?;
        let (kind, len) = (u16_at(at)?, usize::from(u16_at(at + 8)?));
        let data = get(at + 10, len)?;
        if kind == 1 && len == 4 {
            found.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + len;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_with_two_a_records_gives_both_addresses() {
        let mut msg = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0];
        msg.extend_from_slice(b"\x05nginx\x07service\x06consul\x00\x00\x01\x00\x01");
        for last in [21u8, 22] {
            msg.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 127, 0, 21, last]);
        }
        assert_eq!(
            parse(&msg, 0x1234).expect("parse"),
            [Ipv4Addr::new(127, 0, 21, 21), Ipv4Addr::new(127, 0, 21, 22)]
        );
        assert!(parse(&msg, 0x4321).is_err(), "another query's answer");
        assert!(parse(&msg[..20], 0x1234).is_err(), "truncated");
    }
}
