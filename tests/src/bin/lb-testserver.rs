//! A backend "pod": answers every HTTP request (TCP) and every datagram
//! (UDP) on its address with its name, so a client can tell which backend
//! a connect reached.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let mut netns = None;
    let mut listen: Option<SocketAddr> = None;
    let mut name = String::from("backend");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--netns" => netns = args.next(),
            "--listen" => listen = Some(args.next().context("--listen ADDR")?.parse()?),
            "--name" => name = args.next().context("--name NAME")?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    if let Some(ns) = netns {
        lb_tests::sys::enter_netns(&ns)?;
    }
    let listen = listen.context("--listen ADDR is required")?;
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    let udp = UdpSocket::bind(listen).with_context(|| format!("bind udp {listen}"))?;
    println!("listening on {listen}");
    std::io::stdout().flush()?;
    let body = format!("{name}\n");
    let reply = body.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(reply.as_bytes(), peer);
        }
    });
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let body = body.clone();
        std::thread::spawn(move || {
            let _ = serve(conn, &body);
        });
    }
    Ok(())
}

fn serve(mut conn: TcpStream, body: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    // Read the request head; the body of a GET is empty.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    write!(
        conn,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}
