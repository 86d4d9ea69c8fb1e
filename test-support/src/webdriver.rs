//! A small W3C WebDriver client over HTTP (`reqwest`), driving headless Chromium through
//! `chromedriver`: enough to load pages, find elements by CSS selector, click, type, read
//! text, run a script and take a screenshot.
//!
//! `chromedriver` is taken from `$CHROMEDRIVER` (default `/usr/bin/chromedriver`) and Chromium
//! from `$CHROMIUM` (default `/usr/bin/chromium`); Debian's packages `chromium` and
//! `chromium-driver` provide both.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{eventually, Proc, TestDir};

/// The key W3C WebDriver uses for element references.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A browser session; [`Browser::close`] ends it (and Chromium), dropping kills the driver.
pub struct Browser {
    http: reqwest::Client,
    session: String,
    driver: Proc,
    _dir: TestDir,
}

/// An element of the page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Browser {
    /// Starts `chromedriver` on a port of its choosing and a headless Chromium session with
    /// a `width`×`height` window.
    pub async fn start(width: u32, height: u32) -> Browser {
        let dir = TestDir::new("browser");
        let driver_bin =
            std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(
            std::path::Path::new(&driver_bin).exists() && std::path::Path::new(&chromium).exists(),
            "browser tests need {driver_bin} and {chromium}: apt-get install -y chromium chromium-driver"
        );
        let mut cmd = Command::new(&driver_bin);
        cmd.arg("--port=0");
        let driver = Proc::spawn("chromedriver", cmd, dir.join("chromedriver.log"));
        let port = eventually(Duration::from_secs(30), "chromedriver to listen", || {
            let out = driver.output();
            async move {
                out.lines()
                    .find_map(|l| l.split("started successfully on port ").nth(1))
                    .and_then(|p| p.trim_end_matches('.').trim().parse::<u16>().ok())
            }
        })
        .await;
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let profile = dir.join("profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         format!("--window-size={width},{height}"),
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let reply: Value = http
            .post(format!("{base}/session"))
            .body(caps.to_string())
            .send()
            .await
            .unwrap()
            .json_value()
            .await;
        let session = reply["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {reply}"))
            .to_string();
        Browser {
            http,
            session: format!("{base}/session/{session}"),
            driver,
            _dir: dir,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        let reply = req.send().await.unwrap().json_value().await;
        if reply["value"]["error"].is_string() {
            panic!("WebDriver {path}: {}", reply["value"]);
        }
        reply["value"].clone()
    }

    /// Like [`Browser::call`], but a WebDriver error is `Err` (e.g. no such element).
    async fn try_call(&self, path: &str, body: Value) -> Result<Value, Value> {
        let reply = self
            .http
            .post(format!("{}{path}", self.session))
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .json_value()
            .await;
        if reply["value"]["error"].is_string() {
            Err(reply["value"].clone())
        } else {
            Ok(reply["value"].clone())
        }
    }

    /// Loads `url`.
    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// The first element matching `css` now, if any.
    pub async fn try_find(&self, css: &str) -> Option<Element> {
        let v = self
            .try_call("/element", json!({"using": "css selector", "value": css}))
            .await
            .ok()?;
        v[ELEMENT].as_str().map(|id| Element(id.to_string()))
    }

    /// Waits (up to a minute) for an element matching `css`.
    pub async fn find(&self, css: &str) -> Element {
        eventually(Duration::from_secs(60), &format!("element {css}"), || {
            self.try_find(css)
        })
        .await
    }

    /// Waits (up to a minute) for an element matching `css` whose text satisfies `check`;
    /// returns the text. On timeout, panics with the page's text.
    pub async fn wait_text(&self, css: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(el) = self.try_find(css).await {
                if let Some(text) = self.try_call_get(&format!("/element/{}/text", el.0)).await {
                    if check(&text) {
                        return text;
                    }
                }
            }
            if std::time::Instant::now() > deadline {
                let page = self
                    .try_call(
                        "/execute/sync",
                        json!({"script": "return document.body.innerText", "args": []}),
                    )
                    .await
                    .unwrap_or_default();
                panic!(
                    "timed out waiting for {what} ({css}); the page shows:\n{}",
                    page.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn try_call_get(&self, path: &str) -> Option<String> {
        let reply = self
            .http
            .get(format!("{}{path}", self.session))
            .send()
            .await
            .ok()?
            .json_value()
            .await;
        reply["value"].as_str().map(str::to_string)
    }

    /// Clicks `el`.
    pub async fn click(&self, el: &Element) {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/click", el.0),
            Some(json!({})),
        )
        .await;
    }

    /// Clears `el` (an input) and types `text` into it.
    pub async fn fill(&self, el: &Element, text: &str) {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/clear", el.0),
            Some(json!({})),
        )
        .await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/value", el.0),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// The text of `el`.
    pub async fn text(&self, el: &Element) -> String {
        self.call(
            reqwest::Method::GET,
            &format!("/element/{}/text", el.0),
            None,
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its result.
    pub async fn exec(&self, script: &str, args: Value) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Accepts the open `confirm` / `alert` dialog.
    pub async fn accept_alert(&self) {
        self.call(reqwest::Method::POST, "/alert/accept", Some(json!({})))
            .await;
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        let b64 = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64_decode(b64.as_str().unwrap_or_default())
    }

    /// Ends the session (Chromium quits), then the driver.
    pub async fn close(mut self) {
        let _ = self
            .http
            .delete(&self.session)
            .timeout(Duration::from_secs(20))
            .send()
            .await;
        self.driver.terminate(Duration::from_secs(5));
    }
}

trait JsonValue {
    async fn json_value(self) -> Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> Value {
        let bytes = self.bytes().await.unwrap_or_default();
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    }
}

/// Standard base64 (with padding) to bytes.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64() {
        assert_eq!(super::base64_decode("aGVsbG8="), b"hello");
        assert_eq!(super::base64_decode("aGk="), b"hi");
        assert_eq!(super::base64_decode("YWJj"), b"abc");
    }
}
