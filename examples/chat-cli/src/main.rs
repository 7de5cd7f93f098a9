//! Interactive terminal client for chatlog-server (being written).

fn main() {
    eprintln!("chat-cli: not built yet");
    std::process::exit(2);
}
