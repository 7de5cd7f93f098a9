//! Load generator for chatlog-server (being written).

fn main() {
    eprintln!("chatlog-load: not built yet");
    std::process::exit(2);
}
