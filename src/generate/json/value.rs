//! A recognizer of any JSON value, byte by byte: what a schema's key with
//! no listed values takes (strings, numbers, literals, nested arrays and
//! objects), refusing a byte as soon as no JSON value could continue so.

/// What a byte did to an [`AnyValue`].
#[derive(Debug, PartialEq)]
pub(super) enum Fed {
    Took,
    /// The value (a number) had ended; the byte belongs to what follows.
    EndedBefore,
    Refused,
}

/// A recognizer of any JSON value: a stack of open containers and the state
/// inside the innermost.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct AnyValue {
    /// Open containers, `{` or `[`.
    stack: Vec<u8>,
    at: At,
}

#[derive(Debug, Clone, Default, PartialEq)]
enum At {
    /// A value is expected (`first_in_array`: `]` may close instead).
    #[default]
    Value,
    FirstInArray,
    /// In a string (`key`: an object key); `escape`: 0, or 1 after `\`, or
    /// the hex digits left of a `\u` escape + 1.
    Str {
        key: bool,
        escape: u8,
    },
    /// In a number; the grammar's position.
    Number(Num),
    /// In `true`, `false` or `null`: the bytes still to come.
    Literal(&'static [u8]),
    /// After a value inside a container.
    After,
    /// After `{` (`first`) or `,` in an object: a key (or `}` when first).
    Key {
        first: bool,
    },
    /// After a key: `:`.
    Colon,
    /// The whole value is complete.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl Num {
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }

    fn next(self, b: u8) -> Option<Num> {
        let digit = b.is_ascii_digit();
        Some(match (self, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, _) if digit => Num::Int,
            (Num::Int, _) if digit => Num::Int,
            (Num::Zero | Num::Int, b'.') => Num::Dot,
            (Num::Dot | Num::Frac, _) if digit => Num::Frac,
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::E,
            (Num::E, b'+' | b'-') => Num::ESign,
            (Num::E | Num::ESign | Num::Exp, _) if digit => Num::Exp,
            _ => return None,
        })
    }
}

impl AnyValue {
    pub(super) fn is_done(&self) -> bool {
        self.at == At::Done
    }

    /// The state after a value ends: inside a container, or done.
    fn after_value(&self) -> At {
        match self.stack.is_empty() {
            true => At::Done,
            false => At::After,
        }
    }

    pub(super) fn feed(&mut self, b: u8) -> Fed {
        let space = matches!(b, b' ' | b'\n' | b'\t' | b'\r');
        match std::mem::replace(&mut self.at, At::Done) {
            at @ (At::Value | At::FirstInArray | At::After | At::Key { .. } | At::Colon)
                if space =>
            {
                self.at = at
            }
            At::FirstInArray if b == b']' => {
                self.stack.pop();
                self.at = self.after_value();
            }
            At::Value | At::FirstInArray => {
                self.at = match b {
                    b'"' => At::Str {
                        key: false,
                        escape: 0,
                    },
                    b'{' => {
                        self.stack.push(b'{');
                        At::Key { first: true }
                    }
                    b'[' => {
                        self.stack.push(b'[');
                        At::FirstInArray
                    }
                    b'-' => At::Number(Num::Minus),
                    b'0' => At::Number(Num::Zero),
                    b'1'..=b'9' => At::Number(Num::Int),
                    b't' => At::Literal(b"rue"),
                    b'f' => At::Literal(b"alse"),
                    b'n' => At::Literal(b"ull"),
                    _ => return Fed::Refused,
                }
            }
            At::Str { key, escape } => {
                self.at = match (escape, b) {
                    (0, b'"') if key => At::Colon,
                    (0, b'"') => self.after_value(),
                    (0, b'\\') => At::Str { key, escape: 1 },
                    (0, c) if c < 0x20 => return Fed::Refused,
                    (0, _) => At::Str { key, escape: 0 },
                    (1, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                        At::Str { key, escape: 0 }
                    }
                    (1, b'u') => At::Str { key, escape: 5 },
                    (2..=5, c) if c.is_ascii_hexdigit() => At::Str {
                        key,
                        escape: if escape == 2 { 0 } else { escape - 1 },
                    },
                    _ => return Fed::Refused,
                }
            }
            At::Number(n) => match n.next(b) {
                Some(next) => self.at = At::Number(next),
                None if n.complete() => {
                    self.at = self.after_value();
                    if self.at == At::Done {
                        return Fed::EndedBefore;
                    }
                    return self.feed(b);
                }
                None => return Fed::Refused,
            },
            At::Literal(rest) => match rest.split_first() {
                Some((&c, tail)) if c == b => {
                    self.at = match tail.is_empty() {
                        true => self.after_value(),
                        false => At::Literal(tail),
                    }
                }
                _ => return Fed::Refused,
            },
            At::Key { first } => {
                self.at = match b {
                    b'"' => At::Str {
                        key: true,
                        escape: 0,
                    },
                    b'}' if first => {
                        self.stack.pop();
                        self.after_value()
                    }
                    _ => return Fed::Refused,
                }
            }
            At::Colon if b == b':' => self.at = At::Value,
            At::After => {
                let top = *self.stack.last().expect("inside a container");
                self.at = match (top, b) {
                    (b'{', b',') => At::Key { first: false },
                    (b'[', b',') => At::Value,
                    (b'{', b'}') | (b'[', b']') => {
                        self.stack.pop();
                        self.after_value()
                    }
                    _ => return Fed::Refused,
                }
            }
            At::Colon | At::Done => return Fed::Refused,
        }
        Fed::Took
    }
}
