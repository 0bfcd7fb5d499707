//! A backend "pod": answers every HTTP request (TCP) and every datagram
//! (UDP) on its address with its name, so a client can tell which backend
//! a connect reached. `--listen` may be given once per address (a pod's
//! IPv4 and IPv6 addresses).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let mut netns = None;
    let mut listen: Vec<SocketAddr> = Vec::new();
    let mut name = String::from("backend");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--netns" => netns = args.next(),
            "--listen" => listen.push(args.next().context("--listen ADDR")?.parse()?),
            "--name" => name = args.next().context("--name NAME")?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    if let Some(ns) = netns {
        lb_tests::sys::enter_netns(&ns)?;
    }
    anyhow::ensure!(!listen.is_empty(), "--listen ADDR is required");
    let body = format!("{name}\n");
    let mut tcp = Vec::new();
    for addr in &listen {
        let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
        let udp = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
        let reply = body.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((_, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(reply.as_bytes(), peer);
            }
        });
        tcp.push(listener);
    }
    let addrs: Vec<String> = listen.iter().map(ToString::to_string).collect();
    println!("listening on {}", addrs.join(" "));
    std::io::stdout().flush()?;
    let last = tcp.pop().context("a listener")?;
    for listener in tcp {
        let body = body.clone();
        std::thread::spawn(move || accept(&listener, &body));
    }
    accept(&last, &body);
    Ok(())
}

fn accept(listener: &TcpListener, body: &str) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let body = body.to_owned();
        std::thread::spawn(move || {
            let _ = serve(conn, &body);
        });
    }
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
