//! A small HTTP/1.1 keep-alive load generator for the benchmark, standard library only.
//! wrk 4.1 cannot measure HEAD (it waits for a body that never comes), so bench/run uses
//! this for HEAD requests. One thread per connection; prints requests/s and latency
//! percentiles in wrk's words so bench/run parses both the same way.
//!
//! Usage: load -c CONNECTIONS -d SECONDS [-m METHOD] [-H 'Name: value']... http://HOST:PORT/PATH
//!        load --walk KEY [-H 'Name: value']... http://HOST:PORT/PATH
//!
//! `--walk` follows `Link: <...>; rel="next"` from PATH on one kept-alive connection, as a
//! client listing every tag or repository does, and prints the requests made, the entries
//! of the JSON array KEY seen, and the time taken. It costs the client next to nothing,
//! so the servers are measured, not the client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    connections: usize,
    seconds: u64,
    method: String,
    headers: Vec<String>,
    host: String,
    path: String,
    walk: Option<String>,
}

fn usage() -> ! {
    eprintln!("usage: load -c CONNECTIONS -d SECONDS [-m METHOD] [-H 'Name: value']... http://HOST:PORT/PATH");
    eprintln!("       load --walk KEY [-H 'Name: value']... http://HOST:PORT/PATH");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        connections: 64,
        seconds: 10,
        method: "GET".into(),
        headers: Vec::new(),
        host: String::new(),
        path: String::new(),
        walk: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "-c" => a.connections = value().parse().unwrap_or_else(|_| usage()),
            "-d" => a.seconds = value().parse().unwrap_or_else(|_| usage()),
            "-m" => a.method = value(),
            "-H" => a.headers.push(value()),
            "--walk" => a.walk = Some(value()),
            url => {
                let rest = url.strip_prefix("http://").unwrap_or_else(|| usage());
                let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                a.host = host.to_string();
                a.path = if path.is_empty() { "/".into() } else { path.to_string() };
            }
        }
    }
    if a.host.is_empty() || a.connections == 0 {
        usage()
    }
    a
}

/// One whole response: status, the `Link` header's next path, and the body (read by
/// `Content-Length` or chunked; none after HEAD).
fn read_response(
    r: &mut BufReader<TcpStream>,
    head: bool,
) -> std::io::Result<(u16, Option<String>, Vec<u8>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut length, mut chunked, mut next) = (0usize, false, None);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((k, v)) = l.split_once(':') else { continue };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            length = v.parse().unwrap_or(0);
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.eq_ignore_ascii_case("chunked");
        } else if k.eq_ignore_ascii_case("link") && v.contains("rel=\"next\"") {
            let url = &v[v.find('<').map_or(0, |i| i + 1)..v.find('>').unwrap_or(v.len())];
            // An absolute URL keeps only its path and query.
            let path = match url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) {
                Some(rest) => &rest[rest.find('/').unwrap_or(rest.len())..],
                None => url,
            };
            next = Some(path.to_string());
        }
    }
    let mut body = Vec::new();
    if head {
        return Ok((status, next, body));
    }
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            line.clear();
            r.read_line(&mut line)?; // the CRLF after the chunk (or the trailer's end)
            if size == 0 {
                break;
            }
        }
    } else {
        body.resize(length, 0);
        r.read_exact(&mut body)?;
    }
    Ok((status, next, body))
}

/// The entries of the JSON array `key` in `body`: tag and repository names hold neither
/// quotes nor escapes, so each entry is a pair of quotes.
fn count_entries(body: &[u8], key: &str) -> usize {
    let text = String::from_utf8_lossy(body);
    let Some(at) = text.find(&format!("\"{key}\":")) else { return 0 };
    let rest = &text[at..];
    match (rest.find('['), rest.find(']')) {
        (Some(open), Some(close)) => rest[open..close].matches('"').count() / 2,
        _ => 0,
    }
}

fn walk(a: &Args, key: &str) {
    let stream = TcpStream::connect(&a.host).expect("connect");
    stream.set_nodelay(true).ok();
    let mut w = stream.try_clone().expect("clone socket");
    let mut r = BufReader::with_capacity(256 * 1024, stream);
    let start = Instant::now();
    let (mut path, mut requests, mut entries) = (Some(a.path.clone()), 0, 0);
    while let Some(p) = path.take() {
        let mut req = format!("GET {p} HTTP/1.1\r\nHost: {}\r\n", a.host);
        for h in &a.headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        w.write_all(req.as_bytes()).expect("send");
        let (status, next, body) = read_response(&mut r, false).expect("response");
        if status != 200 {
            eprintln!("GET {p}: status {status}");
            std::process::exit(1);
        }
        requests += 1;
        entries += count_entries(&body, key);
        path = next;
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    println!("walk: {requests} requests, {entries} entries, {ms:.3} ms");
}

fn main() {
    let a = parse_args();
    if let Some(key) = a.walk.clone() {
        walk(&a, &key);
        return;
    }
    let mut req = format!("{} {} HTTP/1.1\r\nHost: {}\r\n", a.method, a.path, a.host);
    for h in &a.headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let req = Arc::new(req.into_bytes());
    let head = a.method.eq_ignore_ascii_case("HEAD");
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::<u32>::new()));
    let errors = Arc::new(Mutex::new(0u64));
    let start = Instant::now();
    let threads: Vec<_> = (0..a.connections)
        .map(|_| {
            let (req, stop, latencies, errors, host) = (
                Arc::clone(&req),
                Arc::clone(&stop),
                Arc::clone(&latencies),
                Arc::clone(&errors),
                a.host.clone(),
            );
            std::thread::spawn(move || {
                let mut mine = Vec::with_capacity(1 << 16);
                let mut bad = 0u64;
                let stream = TcpStream::connect(&host).expect("connect");
                stream.set_nodelay(true).ok();
                let mut w = stream.try_clone().expect("clone socket");
                let mut r = BufReader::with_capacity(64 * 1024, stream);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if w.write_all(&req).is_err() {
                        bad += 1;
                        break;
                    }
                    match read_response(&mut r, head) {
                        Ok((s, _, _)) if (200..400).contains(&s) => {
                            mine.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX))
                        }
                        Ok(_) => bad += 1,
                        Err(_) => {
                            bad += 1;
                            break;
                        }
                    }
                }
                latencies.lock().unwrap().extend(mine);
                *errors.lock().unwrap() += bad;
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(a.seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().ok();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut l = latencies.lock().unwrap().clone();
    l.sort_unstable();
    let pct = |p: f64| -> f64 {
        if l.is_empty() {
            return 0.0;
        }
        let i = ((l.len() as f64 * p / 100.0).ceil() as usize).clamp(1, l.len()) - 1;
        f64::from(l[i]) / 1000.0
    };
    println!("  Latency Distribution");
    println!("     50%    {:.2}ms", pct(50.0));
    println!("     99%    {:.2}ms", pct(99.0));
    println!("  {} requests in {elapsed:.2}s", l.len());
    let errors = *errors.lock().unwrap();
    if errors > 0 {
        println!("  Non-2xx or 3xx responses: {errors}");
    }
    println!("Requests/sec: {:.2}", l.len() as f64 / elapsed);
}
