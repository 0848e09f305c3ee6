//! An incremental scanner that finds one top-level key of a JSON object in a body that arrives
//! in arbitrary pieces, and captures only that key's raw value.
//!
//! It keeps a few bytes of state (string/escape flags, nesting depth, key match progress) and the
//! captured value, capped; it never keeps the rest of the body and never validates it. Keys are
//! matched on their raw bytes: serializers do not escape plain ASCII letters.

/// Where the scanner is relative to the root object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the root value; only whitespace may come first.
    BeforeRoot,
    /// Inside the root object, where the next string is a key.
    ExpectKey,
    /// Inside a top-level key string; `Some(n)` while its first `n` bytes match the target.
    InKey(Option<usize>),
    /// After a top-level key, waiting for `:`.
    AfterKey { wanted: bool },
    /// Inside a top-level value, up to the `,` or `}` that ends it.
    InValue,
    /// The root ended, or the body is not a JSON object: nothing more to find.
    Done,
}

#[derive(Debug)]
pub(super) struct TopLevelValue {
    key: &'static [u8],
    cap: usize,
    state: State,
    /// Depth of open objects and arrays; 1 is inside the root object.
    depth: u32,
    /// Inside a string below or at the top level (top-level keys are tracked by `State::InKey`).
    in_string: bool,
    escaped: bool,
    /// Capturing the current value: it belongs to the wanted key.
    capturing: bool,
    /// The current value outgrew `cap`; it is dropped rather than parsed truncated.
    overflowed: bool,
    capture: Vec<u8>,
}

impl TopLevelValue {
    pub(super) fn new(key: &'static [u8], cap: usize) -> Self {
        TopLevelValue {
            key,
            cap,
            state: State::BeforeRoot,
            depth: 0,
            in_string: false,
            escaped: false,
            capturing: false,
            overflowed: false,
            capture: Vec::new(),
        }
    }

    /// Scans one chunk; `on_value` gets the raw bytes of each complete value of the wanted key.
    pub(super) fn feed(&mut self, chunk: &[u8], mut on_value: impl FnMut(&[u8])) {
        for &b in chunk {
            if self.state == State::Done {
                return;
            }
            self.step(b, &mut on_value);
        }
    }

    #[cfg(test)]
    pub(super) fn buffered(&self) -> usize {
        self.capture.len()
    }

    fn step(&mut self, b: u8, on_value: &mut impl FnMut(&[u8])) {
        if let State::InKey(progress) = self.state {
            self.key_byte(b, progress);
            return;
        }
        if self.in_string {
            self.keep(b);
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            return;
        }
        match b {
            b' ' | b'\t' | b'\n' | b'\r' if self.depth <= 1 && !self.capturing => {}
            b'{' if self.state == State::BeforeRoot => {
                self.depth = 1;
                self.state = State::ExpectKey;
            }
            _ if self.state == State::BeforeRoot => self.state = State::Done,
            b'"' if self.state == State::ExpectKey => self.state = State::InKey(Some(0)),
            b':' if self.depth == 1 => {
                if let State::AfterKey { wanted } = self.state {
                    self.state = State::InValue;
                    self.capturing = wanted;
                    self.overflowed = false;
                    self.capture.clear();
                }
            }
            b',' if self.depth == 1 => {
                self.end_value(on_value);
                self.state = State::ExpectKey;
            }
            // Closing the root; a stray `]` here is malformed, and treating it as the end is
            // as good a guess as any.
            b'}' | b']' if self.depth == 1 => {
                self.end_value(on_value);
                self.depth = 0;
                self.state = State::Done;
            }
            b'{' | b'[' => {
                self.depth = self.depth.saturating_add(1);
                self.keep(b);
            }
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
                self.keep(b);
            }
            b'"' => {
                self.in_string = true;
                self.keep(b);
            }
            _ => self.keep(b),
        }
    }

    fn key_byte(&mut self, b: u8, progress: Option<usize>) {
        if self.escaped {
            self.escaped = false;
            self.state = State::InKey(None);
            return;
        }
        match b {
            b'"' => {
                self.state = State::AfterKey {
                    wanted: progress == Some(self.key.len()),
                }
            }
            b'\\' => {
                // An escaped key is never the plain ASCII key we look for.
                self.escaped = true;
                self.state = State::InKey(None);
            }
            _ => {
                let next = progress
                    .filter(|&n| self.key.get(n) == Some(&b))
                    .map(|n| n + 1);
                self.state = State::InKey(next);
            }
        }
    }

    fn keep(&mut self, b: u8) {
        if !self.capturing || self.overflowed {
            return;
        }
        if self.capture.len() < self.cap {
            self.capture.push(b);
        } else {
            self.overflowed = true;
            self.capture = Vec::new();
        }
    }

    fn end_value(&mut self, on_value: &mut impl FnMut(&[u8])) {
        if self.capturing && !self.overflowed {
            on_value(&self.capture);
        }
        self.capturing = false;
        self.overflowed = false;
        self.capture.clear();
    }
}
