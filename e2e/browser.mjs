// Flagsmith's JavaScript SDK (npm `flagsmith`) in headless Chromium, subscribed to a real
// flagsmith-sse with `realtime: true`, from another origin (so CORS is exercised), over
// HTTP/1.1 and over HTTP/2 with TLS. A small mock of Flagsmith's flags API stamps each
// response with X-Flagsmith-Document-Updated-At; a newer timestamp posted to queue-change
// must make the SDK fetch its flags again, an equal one must not.
//
//   node e2e/browser.mjs target/debug/flagsmith-sse
//
// Needs /usr/bin/chromium (Debian's package) and `npm ci` in e2e/.
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const binary = process.argv[2] ?? join(here, "..", "target", "debug", "flagsmith-sse");
const TOKEN = "e2e-token";
const ENV = "e2eEnvironmentKey";
const sdk = readFileSync(join(here, "node_modules", "flagsmith", "index.js"));
const deadline = (ms) => new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/// The page's origin and Flagsmith's flags API, in one small server.
function startMockApi() {
  const state = { fetches: 0, updatedAt: "1752500000.5" };
  const server = createServer((req, res) => {
    const cors = {
      "access-control-allow-origin": "*",
      "access-control-allow-headers": "*, x-environment-key, content-type",
      "access-control-expose-headers": "x-flagsmith-document-updated-at",
    };
    if (req.method === "OPTIONS") {
      res.writeHead(204, cors).end();
    } else if (req.url.startsWith("/api/v1/flags/")) {
      state.fetches += 1;
      res.writeHead(200, { ...cors, "content-type": "application/json", "x-flagsmith-document-updated-at": state.updatedAt });
      res.end(JSON.stringify([{ enabled: true, feature_state_value: `v${state.fetches}`, feature: { id: 1, name: "banner", type: "STANDARD" } }]));
    } else if (req.url === "/flagsmith.js") {
      res.writeHead(200, { "content-type": "text/javascript" }).end(sdk);
    } else {
      res.writeHead(200, { "content-type": "text/html" }).end(`<!doctype html><html><body>
<script src="/flagsmith.js"></script>
<script>
  const params = new URLSearchParams(location.search);
  window.flagsmith.init({
    environmentID: ${JSON.stringify(ENV)},
    api: location.origin + "/api/v1/",
    realtime: true,
    eventSourceUrl: params.get("sse"),
    onChange: () => { window.changes = (window.changes || 0) + 1; },
  });
</script></body></html>`);
    }
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve({ server, state, port: server.address().port })));
}

/// Starts flagsmith-sse (in-process broker: no NATS needed here) and learns its address.
function startService(extraEnv) {
  const child = spawn(binary, [], {
    env: { SSE_AUTHENTICATION_TOKEN: TOKEN, BROKER: "memory", LISTEN_ADDR: "127.0.0.1:0", KEEPALIVE_INTERVAL: "5s", ...extraEnv },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  return new Promise((resolve, reject) => {
    child.stderr.on("data", (chunk) => {
      log += chunk;
      const found = /flagsmith-sse listening on (\S+)\n/.exec(log);
      if (found) resolve({ child, addr: found[1], log: () => log });
    });
    child.on("exit", (code) => reject(new Error(`flagsmith-sse exited ${code}:\n${log}`)));
  });
}

/// The service's subscriber gauge, read from /metricsz.
async function subscribers(base) {
  const { request } = await import(base.startsWith("https") ? "node:https" : "node:http");
  return new Promise((resolve) => {
    const req = request(`${base}/metricsz`, { rejectUnauthorized: false }, (res) => {
      let text = "";
      res.on("data", (chunk) => (text += chunk));
      res.on("end", () => resolve(Number(/^flagsmith_sse_subscribers (\d+)$/m.exec(text)?.[1] ?? 0)));
    });
    req.on("error", () => resolve(0));
    req.end();
  });
}

async function post(base, updatedAt) {
  const url = `${base}/sse/environments/${ENV}/queue-change`;
  // Node's fetch has no option to trust a self-signed certificate, so TLS posts go
  // through curl-free node:https instead.
  const { request } = await import(base.startsWith("https") ? "node:https" : "node:http");
  return new Promise((resolve, reject) => {
    const req = request(url, { method: "POST", rejectUnauthorized: false, headers: { authorization: `Token ${TOKEN}`, "content-type": "application/json" } }, (res) => {
      res.resume();
      res.on("end", () => resolve(res.statusCode));
    });
    req.on("error", reject);
    req.end(JSON.stringify({ updated_at: updatedAt }));
  });
}

async function waitFor(what, check, ms = 20000) {
  const until = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

async function scenario(name, { tls }) {
  const api = await startMockApi();
  let env = {};
  if (tls) {
    const dir = mkdtempSync(join(tmpdir(), "sse-e2e-"));
    execFileSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
      "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem")], { stdio: "ignore" });
    env = { TLS_CERT_FILE: join(dir, "cert.pem"), TLS_KEY_FILE: join(dir, "key.pem") };
  }
  const svc = await startService(env);
  const port = svc.addr.split(":").pop();
  const base = tls ? `https://localhost:${port}` : `http://127.0.0.1:${port}`;
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", ...(tls ? ["--ignore-certificate-errors"] : [])],
  });
  const consoleLines = [];
  try {
    const page = await browser.newPage();
    page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    page.on("requestfailed", (r) => consoleLines.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));
    const cdp = await page.context().newCDPSession(page);
    await cdp.send("Network.enable");
    let streamProtocol = null;
    cdp.on("Network.responseReceived", (e) => {
      if (e.response.url.includes("/stream")) streamProtocol = e.response.protocol;
    });
    // The page's origin (the mock) differs from the service's: CORS is on the path.
    await page.goto(`http://127.0.0.1:${api.port}/?sse=${encodeURIComponent(base + "/")}`);
    await waitFor("the SDK's first fetch", () => api.state.fetches === 1);
    // The SDK holds the flags (and their X-Flagsmith-Document-Updated-At) once onChange ran;
    // an event before that would make it fetch whatever the timestamp.
    await page.waitForFunction(() => (window.changes ?? 0) >= 1, null, { timeout: 20000 });
    await waitFor("the SDK's event stream", async () => (await subscribers(base)) >= 1);
    await sleep(300);
    // Same timestamp as the flags the SDK has: no refetch.
    if ((await post(base, 1752500000.5)) !== 200) throw new Error("queue-change refused");
    await sleep(1500);
    if (api.state.fetches !== 1) throw new Error(`an equal timestamp made the SDK refetch (${api.state.fetches} fetches)`);
    // Newer: the SDK fetches again.
    api.state.updatedAt = "1752500010.25";
    if ((await post(base, "2025-07-14T13:33:30.250000+00:00")) !== 200) throw new Error("queue-change refused");
    await waitFor("a refetch after a newer timestamp", () => api.state.fetches === 2);
    const value = await page.evaluate(() => window.flagsmith.getValue("banner"));
    if (value !== "v2") throw new Error(`flags not refreshed: banner=${value}`);
    const want = tls ? "h2" : "http/1.1";
    await waitFor("the stream's protocol from the browser", () => streamProtocol !== null);
    if (streamProtocol !== want) throw new Error(`stream over ${streamProtocol}, expected ${want}`);
    console.log(`ok - ${name} (stream over ${streamProtocol}, ${api.state.fetches} fetches)`);
  } catch (err) {
    throw new Error(`${err.message}\nbrowser console:\n${consoleLines.join("\n")}\nservice log:\n${svc.log().slice(-3000)}`);
  } finally {
    await browser.close();
    svc.child.kill();
    api.server.close();
  }
}

let passed = 0;
let failed = 0;
for (const [name, options] of [["HTTP/1.1, cross-origin", { tls: false }], ["HTTP/2 over TLS, cross-origin", { tls: true }]]) {
  try {
    await Promise.race([scenario(name, options), deadline(90000)]);
    passed += 1;
  } catch (err) {
    failed += 1;
    console.log(`not ok - ${name}: ${err.stack ?? err}`);
  }
}
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
