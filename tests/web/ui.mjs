// Drives Kairos's page in headless Chromium against a running node and prints what it saw
// as one JSON object (the Rust test `web::` asserts on it). Screenshots go to KAIROS_OUT.
// Environment: KAIROS_URL, KAIROS_TOKEN (an admin), KAIROS_VIEWER_TOKEN, KAIROS_PROPOSAL
// (a proposal on the fork `exp` with two ops), KAIROS_BAD_PROPOSAL (on main, its commit
// fails the probes), KAIROS_OUT, CHROMIUM.

import { chromium } from "playwright-core";

const url = process.env.KAIROS_URL;
const admin = process.env.KAIROS_TOKEN;
const viewer = process.env.KAIROS_VIEWER_TOKEN;
const proposal = process.env.KAIROS_PROPOSAL;
const bad = process.env.KAIROS_BAD_PROPOSAL;
const out = process.env.KAIROS_OUT;
const seen = {};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu"],
});
const errors = [];
const consoleLines = [];
let step = "start";

async function page(token) {
  // The test evaluates its own probes in the page, which the page's CSP forbids.
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 }, bypassCSP: true });
  const tab = await context.newPage();
  tab.on("pageerror", (error) => errors.push(String(error)));
  tab.on("console", (message) => consoleLines.push(message.type() + ": " + message.text()));
  tab.on("dialog", (dialog) => { errors.push("dialog: " + dialog.message()); dialog.dismiss(); });
  await tab.goto(url + "/");
  if (token !== undefined) {
    await tab.fill("#token", token);
    await tab.click("#signin button[type=submit]");
  }
  return tab;
}

async function api(path, options = {}) {
  const response = await fetch(url + path, {
    method: options.method || "GET",
    headers: { Authorization: "Bearer " + admin, "Content-Type": "application/json" },
    body: options.body ? JSON.stringify(options.body) : undefined,
  });
  return { status: response.status, body: await response.json().catch(() => null) };
}

try {
  // A wrong token: back to the sign-in form, saying why.
  const wrong = await page("kairos_wrong");
  await wrong.waitForSelector("#signin .badge");
  seen.wrong_token = await wrong.textContent("#signin .badge");
  await wrong.context().close();

  const tab = await page(admin);
  await tab.waitForSelector("#replicas tbody tr");
  seen.replicas = await tab.textContent("#replicas");
  await tab.screenshot({ path: out + "/replicas.png", fullPage: true });

  // The timeline: 10 000 frames drawn, then scrubbing.
  step = 'The timeline';
  await tab.goto(url + "/#/replica/web");
  await tab.waitForFunction(() => window.kairosTimings.timeline && window.kairosTimings.scrub);
  seen.timeline = await tab.evaluate(() => window.kairosTimings.timeline);
  seen.drawn = await tab.evaluate(() => window.kairosTimings.drawn);
  await tab.screenshot({ path: out + "/timeline.png", fullPage: true });
  const frames = seen.timeline.frames;
  const scrubs = [];
  const scrubTo = async (index) => {
    await tab.evaluate((index) => {
      window.kairosTimings.scrub = null;
      const range = document.getElementById("scrubber");
      range.value = String(index);
      range.dispatchEvent(new Event("input"));
    }, index);
    await tab.waitForFunction(() => window.kairosTimings.scrub);
    scrubs.push(await tab.evaluate(() => window.kairosTimings.scrub.ms));
  };
  await scrubTo(0);
  seen.first_config = await tab.textContent("#config");
  for (let i = 1; i <= 10; i++) await scrubTo(Math.floor((frames - 1) * i / 10));
  seen.last_config = await tab.textContent("#config");
  seen.scrub_ms = scrubs;
  // Names and values that look like markup stay text.
  seen.files = await tab.textContent("#files");
  seen.injected = await tab.evaluate(() => ({ pwned: window.pwned === 1, images: document.querySelectorAll("#state img, #state script").length }));
  // Binary and huge files.
  await tab.click("#files a:text('blob.bin')");
  await tab.waitForSelector("#binary");
  seen.binary = await tab.textContent("#binary");
  await tab.click("#files a:text('huge.log')");
  await tab.waitForSelector("#truncated");
  seen.truncated = await tab.textContent("#truncated");
  // The diff between two instants.
  await scrubTo(0);
  await tab.click("#pin");
  await scrubTo(frames - 1);
  await tab.waitForSelector("#diff-config");
  seen.diff = await tab.textContent("#diff");
  await tab.screenshot({ path: out + "/state-and-diff.png", fullPage: true });

  // Proposals and the what-if.
  step = 'Proposals and the what-if.';
  await tab.goto(url + "/#/replica/web/proposals");
  await tab.waitForSelector("#proposals");
  seen.proposals = await tab.textContent("#proposals");
  await tab.screenshot({ path: out + "/proposals.png", fullPage: true });
  const logBefore = (await api("/api/replicas/web/log")).body.entries.length;
  await tab.goto(url + "/#/replica/web/proposal/" + proposal);
  await tab.waitForSelector("#predicted");
  await tab.reload();
  await tab.waitForSelector("#predicted");
  // Looking changes nothing: no sandbox or prediction is recorded by a visit.
  seen.log_growth_from_visits = (await api("/api/replicas/web/log")).body.entries.length - logBefore;
  seen.current = await tab.textContent("#current");
  seen.predicted = await tab.textContent("#predicted");
  seen.changed_rows = await tab.evaluate(() => document.querySelectorAll("#predicted tr.changed, #predicted tr.added").length);
  seen.confidence = await tab.textContent("#prediction");
  await tab.screenshot({ path: out + "/what-if.png", fullPage: true });
  // The real check, then a commit of the first op only (the staged commit).
  step = 'The real check';
  await tab.click("#run-check");
  await tab.waitForSelector("#check-badge");
  seen.check = await tab.textContent("#check-badge");
  const before = (await api("/api/replicas/web/history?timeline=exp")).body.length;
  await tab.evaluate(() => { window.kairosTimings.events = []; });
  await tab.uncheck("input.op[value='2']");
  await tab.click("#commit");
  await tab.waitForFunction(() => (window.kairosTimings.events || []).some((e) => e.event === "commit" && e.status === "committed"));
  seen.commit_event = await tab.evaluate(() => window.kairosTimings.events.find((e) => e.event === "commit" && e.status === "committed"));
  const after = (await api("/api/replicas/web/history?timeline=exp")).body;
  seen.exp_frames = [before, after.length];
  const head = await api("/api/replicas/web/state?at=" + encodeURIComponent("exp@latest"));
  seen.exp_head_files = head.body.entries.map((e) => e.path);
  seen.exp_head_config = head.body.config.filter((c) => c.key === "port").map((c) => c.value);

  // A stale page: another party commits meanwhile; this page's commit is refused, clearly.
  step = 'A stale page';
  const stale = await page(admin);
  await stale.goto(url + "/#/replica/web/proposal/" + proposal);
  await stale.waitForSelector("#commit");
  await api("/api/replicas/web/proposals/" + proposal + "/commit", { method: "POST", body: { ops: [2] } });
  await stale.click("#commit");
  await stale.waitForSelector("#banner:not([hidden])");
  seen.stale = await stale.textContent("#banner");
  await stale.context().close();

  // A rollback appears live on the replicas page.
  step = 'A rollback appears live on the replicas page.';
  await tab.goto(url + "/#/");
  await tab.waitForSelector("#replicas tbody tr");
  await tab.evaluate(() => { window.kairosTimings.events = []; });
  const committed = await api("/api/replicas/web/proposals/" + bad + "/commit", { method: "POST", body: {} });
  seen.bad_commit = committed.body && committed.body.status;
  await tab.waitForFunction(() => (window.kairosTimings.events || []).some((e) => e.event === "rollback"), null, { timeout: 30000 });
  await tab.waitForSelector(".toast.bad");
  seen.rollback_toast = await tab.textContent(".toast.bad");
  await tab.waitForTimeout(700);
  await tab.screenshot({ path: out + "/rollback.png", fullPage: true });

  // A viewer sees, and cannot act.
  step = 'A viewer sees';
  const look = await page(viewer);
  await look.goto(url + "/#/replica/web/proposal/" + proposal);
  await look.waitForSelector("#proposal-actions");
  seen.viewer_buttons = await look.evaluate(() => ["run-check", "approve", "commit"].map((id) => document.getElementById(id).disabled));
  await look.context().close();
} catch (error) {
  seen.failure = "at step " + step + ": " + String(error && error.stack || error);
  seen.console = consoleLines.slice(-30);
}
seen.page_errors = errors;
await browser.close();
console.log(JSON.stringify(seen));
