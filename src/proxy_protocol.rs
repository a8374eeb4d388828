//! The PROXY protocol header (v1 text or v2 binary) a TCP load balancer puts in front of a
//! connection, naming the real client. Read only on listeners with `proxy_protocol: true`, and
//! only from peers in `limits.trusted_proxies` (anyone else could claim any address). Parsing
//! is `proxy-header`'s; this module reads exactly the header's bytes from the socket, so what
//! follows it (a TLS ClientHello, an IMAP command) stays in the socket for the session.

use std::io;
use std::net::SocketAddr;

use proxy_header::{Error as ParseError, ParseConfig, ProxyHeader};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The most bytes a header may take: a v1 header is at most 107; v2 carries TLVs (load
/// balancers add a few hundred bytes at most).
pub const MAX_HEADER: usize = 4096;

/// Why no header could be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the connection closed before a complete PROXY header")]
    Closed,
    #[error("no valid PROXY header: {0}")]
    Invalid(String),
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

/// Reads one PROXY header from `stream` and returns the client address it names, or `None`
/// for a header that names none (`LOCAL` in v2, `UNKNOWN` in v1: the balancer's own health
/// check). Consumes the header's bytes and nothing after them.
///
/// # Errors
/// The stream closed first, the bytes are not a PROXY header, or it is too long.
pub async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, HeaderError> {
    let config = ParseConfig {
        include_tlvs: false,
        allow_v1: true,
        allow_v2: true,
    };
    // Bytes of an incomplete header already taken from the socket: everything that arrived
    // before the header was complete belongs to it, so taking it all loses nothing.
    let mut taken: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 1024];
    loop {
        // Waits for bytes without taking them.
        let n = stream.peek(&mut chunk).await?;
        let peeked = chunk.get(..n).unwrap_or_default();
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        let mut candidate = taken.clone();
        candidate.extend_from_slice(peeked);
        match ProxyHeader::parse(&candidate, config) {
            Ok((header, used)) => {
                let source = header.proxied_address().map(|a| a.source);
                let rest = used.saturating_sub(taken.len());
                let mut sink = vec![0u8; rest];
                stream.read_exact(&mut sink).await?;
                return Ok(source);
            }
            Err(ParseError::BufferTooShort) => {
                if candidate.len() >= MAX_HEADER {
                    return Err(HeaderError::TooLong);
                }
                let mut sink = vec![0u8; n];
                stream.read_exact(&mut sink).await?;
                taken.extend_from_slice(&sink);
            }
            Err(e) => return Err(HeaderError::Invalid(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A connected pair: (client side, server side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    fn v2_ipv4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(0x21); // version 2, PROXY
        h.push(0x11); // TCP over IPv4
        h.extend_from_slice(&12u16.to_be_bytes());
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(&sport.to_be_bytes());
        h.extend_from_slice(&dport.to_be_bytes());
        h
    }

    async fn rest(server: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut got = vec![0u8; len];
        server.read_exact(&mut got).await.expect("rest");
        got
    }

    #[tokio::test]
    async fn v1_names_the_client_and_leaves_what_follows() {
        let (mut client, mut server) = pair().await;
        client
            .write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 993\r\n\x16\x03\x01")
            .await
            .expect("write");
        let source = read_header(&mut server).await.expect("header");
        assert_eq!(source, Some("203.0.113.7:51000".parse().expect("addr")));
        assert_eq!(rest(&mut server, 3).await, b"\x16\x03\x01");
    }

    #[tokio::test]
    async fn v2_names_the_client_and_leaves_what_follows() {
        let (mut client, mut server) = pair().await;
        let mut bytes = v2_ipv4([198, 51, 100, 9], 40000, [192, 0, 2, 1], 143);
        bytes.extend_from_slice(b"a1 CAPABILITY\r\n");
        client.write_all(&bytes).await.expect("write");
        let source = read_header(&mut server).await.expect("header");
        assert_eq!(source, Some("198.51.100.9:40000".parse().expect("addr")));
        assert_eq!(rest(&mut server, 15).await, b"a1 CAPABILITY\r\n");
    }

    #[tokio::test]
    async fn a_header_in_pieces_is_put_together() {
        let (mut client, mut server) = pair().await;
        let reader = tokio::spawn(async move {
            let source = read_header(&mut server).await;
            (
                source.map_err(|e| e.to_string()),
                rest(&mut server, 4).await,
            )
        });
        for piece in [
            &b"PROXY TCP6 2001:db8::7 "[..],
            b"2001:db8::1 6",
            b"0000 587\r\nEHLO",
        ] {
            client.write_all(piece).await.expect("write");
            client.flush().await.expect("flush");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let (source, after) = reader.await.expect("join");
        assert_eq!(
            source,
            Ok(Some("[2001:db8::7]:60000".parse().expect("addr")))
        );
        assert_eq!(after, b"EHLO");
    }

    #[tokio::test]
    async fn unknown_and_local_name_no_client() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY UNKNOWN\r\n").await.expect("write");
        assert_eq!(read_header(&mut server).await.expect("v1"), None);
        let (mut client, mut server) = pair().await;
        let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        client.write_all(&local).await.expect("write");
        assert_eq!(read_header(&mut server).await.expect("v2"), None);
    }

    #[tokio::test]
    async fn anything_else_is_refused_and_a_close_is_no_header() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"a1 LOGIN x y\r\n").await.expect("write");
        assert!(matches!(
            read_header(&mut server).await,
            Err(HeaderError::Invalid(_))
        ));
        let (client, mut server) = pair().await;
        drop(client);
        assert!(matches!(
            read_header(&mut server).await,
            Err(HeaderError::Closed)
        ));
    }

    #[tokio::test]
    async fn an_endless_header_stops_at_the_bound() {
        let (mut client, mut server) = pair().await;
        let mut header = v2_ipv4([1, 2, 3, 4], 1, [5, 6, 7, 8], 2);
        // Claims a body of 60,000 bytes (TLVs) and sends them.
        header[14..16].copy_from_slice(&60_000u16.to_be_bytes());
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&header).await;
            let _ = client.write_all(&vec![0u8; 60_000]).await;
            client
        });
        assert!(matches!(
            read_header(&mut server).await,
            Err(HeaderError::TooLong)
        ));
        drop(server);
        let _ = writer.await;
    }
}
