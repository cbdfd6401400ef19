//! A client of PyTorch's TCPStore, the key-value store torchrun hosts at
//! `MASTER_ADDR:MASTER_PORT`: the ranks count themselves in and rank 0 publishes the NCCL
//! unique id there. The wire format is c10d's (torch/csrc/distributed/c10d/TCPStore.cpp):
//! a one-byte command, then native-endian u64-length-prefixed strings and byte vectors.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

const VALIDATE: u8 = 0;
const SET: u8 = 1;
const GET: u8 = 3;
const ADD: u8 = 4;
const WAIT: u8 = 6;
const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;
/// The server's answer to WAIT once every key exists.
const STOP_WAITING: u8 = 0;

pub struct Store {
    stream: TcpStream,
    address: String,
}

impl Store {
    /// Connects (retrying until `timeout`: rank 0's store may not listen yet) and validates.
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<Self> {
        let address = format!("{host}:{port}");
        let deadline = Instant::now() + timeout;
        let stream = loop {
            // Every address of the name: `localhost` gives ::1 first, and the store may
            // listen on IPv4 alone.
            let attempt = (host, port).to_socket_addrs().and_then(|addrs| {
                let mut last = std::io::Error::other("the name has no address");
                for addr in addrs {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                        Ok(stream) => return Ok(stream),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            });
            match attempt {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::Distributed(format!("the store at {address} (MASTER_ADDR:MASTER_PORT) did not answer within {} s: {e}", timeout.as_secs())));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let mut store = Self { stream, address };
        store.stream.set_read_timeout(Some(timeout)).map_err(|e| store.error(e))?;
        let mut message = vec![VALIDATE];
        message.extend_from_slice(&VALIDATION_MAGIC.to_ne_bytes());
        store.send(&message)?;
        Ok(store)
    }

    /// Adds `delta` to the integer at `key` (0 when absent) and returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        let mut message = command(ADD, key);
        message.extend_from_slice(&delta.to_ne_bytes());
        self.send(&message)?;
        Ok(i64::from_ne_bytes(self.receive()?))
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let mut message = command(SET, key);
        append_bytes(&mut message, value);
        self.send(&message)
    }

    /// The value at `key`, waiting (up to the connection's timeout) until it is set.
    pub fn get(&mut self, key: &str) -> Result<Vec<u8>> {
        let mut wait = vec![WAIT];
        wait.extend_from_slice(&1u64.to_ne_bytes());
        append_bytes(&mut wait, prefixed(key).as_bytes());
        self.send(&wait)?;
        let [answer] = self.receive::<1>()?;
        if answer != STOP_WAITING {
            return Err(Error::Distributed(format!("the store at {} answered WAIT with {answer}", self.address)));
        }
        self.send(&command(GET, key))?;
        let len = u64::from_ne_bytes(self.receive()?);
        let mut value = vec![0; len as usize];
        self.stream.read_exact(&mut value).map_err(|e| self.error(e))?;
        Ok(value)
    }

    fn send(&mut self, message: &[u8]) -> Result<()> {
        self.stream.write_all(message).map_err(|e| self.error(e))
    }

    fn receive<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut buffer = [0; N];
        self.stream.read_exact(&mut buffer).map_err(|e| self.error(e))?;
        Ok(buffer)
    }

    fn error(&self, e: std::io::Error) -> Error {
        Error::Distributed(format!("the store at {} (MASTER_ADDR:MASTER_PORT): {e}", self.address))
    }
}

fn command(kind: u8, key: &str) -> Vec<u8> {
    let mut message = vec![kind];
    append_bytes(&mut message, prefixed(key).as_bytes());
    message
}

/// torch's clients prefix every key with "/" (`TCPStore::keyPrefix_`); so does flowstep, so
/// that its keys read the same from Python.
fn prefixed(key: &str) -> String {
    format!("/{key}")
}

fn append_bytes(message: &mut Vec<u8>, bytes: &[u8]) {
    message.extend_from_slice(&(bytes.len() as u64).to_ne_bytes());
    message.extend_from_slice(bytes);
}
