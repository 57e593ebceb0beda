// The demo page: a view over the SDK (edgestream.js). Everything it knows
// comes from the session's events and the gateway's /healthz.
//
// What a person sees follows one turn: listening -> hearing (their words as
// they come) -> thinking (the question is final, no answer audio yet) ->
// speaking (answer audio is playing) -> listening. Turns are kept per
// session (a Stop and Start, or a reconnect, begins a new session whose
// turns number from 1 again), and each error is kept under its cause, so
// it goes away when the cause does.
import { GatewayError, GatewaySession } from "./edgestream.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
/** `?gateway=ws://host:port/session` talks to another gateway than the page's own. */
const gatewayUrl = params.get("gateway") ?? GatewaySession.defaultUrl();
const healthUrl = gatewayUrl.replace(/^ws/, "http").replace(/\/session$/, "/healthz");
/** `#token=...` fills in the access token (a fragment never reaches a server's logs). */
const hashToken = new URLSearchParams(location.hash.slice(1)).get("token");
if (hashToken) $("token").value = hashToken;

const KIND_NAMES = { stt: "speech to text", llm: "language model", tts: "text to speech", vision: "vision" };
const LATENCY_TURNS_SHOWN = 4;
const HEALTH_POLL_MS = { settled: 5000, changing: 1500 };
const STATUS_TEXT = {
  idle: "Idle",
  connecting: "Connecting…",
  listening: "Listening",
  hearing: "Hearing you…",
  thinking: "Thinking…",
  speaking: "Speaking",
  reconnecting: "Reconnecting…",
  error: "Not connected",
};

/** @type {GatewaySession | null} */
let session = null;
/** @type {MediaStream | null} the microphone (and camera) this page opened */
let media = null;
/** @type {MediaStreamTrack | null} */
let camera = null;
let stopMicMeter = () => {};
let stopAnswerMeter = () => {};
/** Which session the events now arriving belong to (its id, from session.ready). */
let sessionKey = "";
/** How the next session.ready begins: after Start ("new"), or after a lost connection ("reconnected"). */
let nextSessionWhy = "new";
/** The typed question sent last, until its turn shows up (kept to give it back if it is refused). */
let pendingQuestion = null;
const turns = new Map();
const latencies = [];
let lastHealth = null;
let healthTimer = 0;
const demo = { states: [], gatewayUrl };

// -- state ------------------------------------------------------------------

function setState(state, text = STATUS_TEXT[state]) {
  const status = $("status");
  if (status.dataset.state !== state) {
    demo.states.push(state);
    if (demo.states.length > 200) demo.states.splice(0, 100); // the recent ones are what tests and debugging read
  }
  status.dataset.state = state;
  status.textContent = text;
  const live = session !== null && !["idle", "connecting", "reconnecting", "error"].includes(state);
  $("interrupt").disabled = !(live && (state === "thinking" || state === "speaking"));
  $("question").disabled = $("send").disabled = !live;
}

// -- errors, each under its cause --------------------------------------------

const errors = new Map();

function showError(cause, text) {
  let item = errors.get(cause);
  if (!item) {
    item = document.createElement("div");
    item.className = "error";
    item.setAttribute("role", "alert");
    item.dataset.cause = cause;
    $("errors").append(item);
    errors.set(cause, item);
  }
  item.textContent = text;
}

function clearErrors(test) {
  for (const [cause, item] of errors) {
    if (test(cause)) {
      item.remove();
      errors.delete(cause);
    }
  }
}

const clearError = (cause) => clearErrors((c) => c === cause);

/** A sentence a person can act on, for a GatewayError or an `error` event. */
function explain({ code, message }) {
  switch (code) {
    case "no_worker": {
      const kind = /no (\w+) worker/.exec(message)?.[1] ?? "";
      const name = KIND_NAMES[kind] ?? kind;
      return `No ${name} worker is available, so this turn cannot be answered. ` +
        `It may still be starting; an operator can start one with: edgestream worker ${kind}`;
    }
    case "unreachable":
      return `Cannot reach the gateway at ${gatewayUrl}. Is it running (edgestream up)?`;
    case "shutting_down":
      return "The gateway shut down. Press Start talking to try again once it is back.";
    case "gateway_lost":
      return "The connection to the gateway was lost. Press Start talking to try again.";
    case "too_many_sessions":
      return "The gateway is busy with as many sessions as it can hold. Try again in a moment.";
    case "too_many_client_sessions":
      return "You already hold as many sessions as this gateway allows one client (another tab?). Close one and try again.";
    case "unauthorized":
      return "This gateway needs an access token. Ask its operator for one (edgestream token create NAME) and enter it under Access token.";
    case "token_revoked":
      return "Your access token was revoked, so the session ended. Ask the gateway's operator for a new one.";
    case "still_listening":
      return "Your spoken question is still being heard; send the typed one once it is answered.";
    case "ice_timeout":
    case "connection_failed":
      return "Audio could not connect to the gateway (WebRTC). A firewall may block UDP between you and it.";
    case "timeout":
      return `The gateway at ${gatewayUrl} did not answer in time.`;
    default:
      return message ? message.charAt(0).toUpperCase() + message.slice(1) + "." : code;
  }
}

function explainMediaError(err, what) {
  if (err.name === "NotAllowedError" || err.name === "SecurityError")
    return `Permission to use the ${what} was denied. Allow it for this page (the icon in the address bar) and try again.`;
  if (err.name === "NotFoundError" || err.name === "OverconstrainedError") return `No ${what} was found on this device.`;
  if (err.name === "NotReadableError") return `The ${what} is in use by another application.`;
  return `Cannot open the ${what}: ${err.message}`;
}

// -- workers at the gateway ---------------------------------------------------

async function refreshWorkers() {
  clearTimeout(healthTimer);
  let health = null;
  try {
    const reply = await fetch(healthUrl, { cache: "no-store" });
    health = await reply.json();
  } catch {
    lastHealth = null;
    $("workers").replaceChildren(chip("gateway", "unreachable", "down", true));
    if (!session) showError("gateway", `Cannot reach the gateway at ${healthUrl.replace(/\/healthz$/, "")}. Is it running (edgestream up)?`);
    healthTimer = setTimeout(refreshWorkers, HEALTH_POLL_MS.changing);
    return;
  }
  clearError("gateway");
  lastHealth = health;
  const states = health.states ?? Object.fromEntries(Object.entries(health.workers).map(([k, up]) => [k, up ? "ready" : "none"]));
  const required = new Set(health.required ?? Object.keys(states));
  $("workers").replaceChildren(...Object.entries(states).map(([kind, state]) => chip(kind, state, state, required.has(kind))));
  // An error about a missing kind is over once a worker of it is back.
  for (const [kind, state] of Object.entries(states)) if (state === "ready") clearError(`worker:${kind}`);
  const settled = Object.entries(states).every(([kind, state]) => state === "ready" || (!required.has(kind) && state === "none"));
  healthTimer = setTimeout(refreshWorkers, settled ? HEALTH_POLL_MS.settled : HEALTH_POLL_MS.changing);
}

function chip(kind, state, look, required) {
  const item = document.createElement("li");
  const name = KIND_NAMES[kind] ?? kind;
  const words = { ready: "ready", starting: "starting…", down: "reconnecting…", none: required ? "missing" : "off", unreachable: "unreachable" };
  item.textContent = `${name}: ${words[state] ?? state}${required ? "" : " (optional)"}`;
  item.dataset.kind = kind;
  item.dataset.state = look;
  item.dataset.required = String(required);
  return item;
}

// -- the conversation ---------------------------------------------------------

function turnView(number) {
  const key = `${sessionKey}/${number}`;
  if (!turns.has(key)) {
    const item = document.createElement("li");
    item.className = "turn";
    const you = document.createElement("p");
    you.className = "you partial";
    const answer = document.createElement("p");
    answer.className = "answer";
    answer.hidden = true;
    item.append(you, answer);
    item.dataset.session = sessionKey;
    item.dataset.turn = String(number);
    $("turns").append(item);
    $("empty").hidden = true;
    turns.set(key, { item, you, answer, done: false });
  }
  return turns.get(key);
}

let scrollPending = false;

/** Keep the latest turn in view: once a frame at most, not once per streamed token. */
function scrollToLatest() {
  if (scrollPending) return;
  scrollPending = true;
  requestAnimationFrame(() => {
    scrollPending = false;
    const list = $("turns");
    list.scrollTop = list.scrollHeight;
  });
}

/** A new session begins: a divider, and what was left unfinished in the last one says so. */
function beginSession(id, why) {
  if (id === sessionKey) return;
  endSession(why === "reconnected" ? "the connection dropped" : "stopped");
  sessionKey = id;
  if ($("turns").children.length) {
    const divider = document.createElement("li");
    divider.className = "divider";
    divider.dataset.session = id;
    divider.textContent = `${why === "reconnected" ? "Reconnected" : "New session"} · ${new Date().toLocaleTimeString()}`;
    $("turns").append(divider);
    scrollToLatest();
  }
}

function endSession(why) {
  for (const view of turns.values()) {
    if (view.done) continue;
    view.done = true;
    view.item.classList.add("unfinished");
    const note = document.createElement("span");
    note.className = "cut";
    note.textContent = ` (not finished: ${why})`;
    (view.answer.hidden ? view.you : view.answer).append(note);
    view.you.classList.remove("partial");
  }
}

function announce(text) {
  $("announcer").textContent = text;
}

function render(event) {
  if (event.type === "session.ready") {
    beginSession(event.session_id, nextSessionWhy);
    return;
  }
  const view = event.turn != null && event.type !== "latency" ? turnView(event.turn) : null;
  switch (event.type) {
    case "transcript.partial":
      view.you.textContent = event.text;
      clearErrors((cause) => cause.startsWith("turn:"));
      setState("hearing");
      break;
    case "transcript.final":
      if (event.text === pendingQuestion) pendingQuestion = null;
      view.you.textContent = event.text || "(nothing heard)";
      view.you.classList.remove("partial");
      if (event.text) {
        announce(`You said: ${event.text}`);
        setState("thinking");
      } else {
        view.done = true;
        setState("listening");
      }
      break;
    case "waiting":
      // Every worker of a kind is full: the turn waits in line instead of failing.
      view.answer.hidden = false;
      view.answer.classList.add("waiting");
      view.answer.textContent = `Busy: waiting for a free ${KIND_NAMES[event.kind] ?? event.kind} worker…`;
      break;
    case "answer.token":
      view.answer.hidden = false;
      if (view.answer.classList.contains("waiting")) {
        view.answer.classList.remove("waiting");
        view.answer.textContent = "";
      }
      view.answer.textContent += event.text;
      break;
    case "answer.done":
      view.done = true;
      view.answer.hidden = false;
      view.answer.classList.remove("waiting");
      view.answer.textContent = event.text.trim();
      if (event.interrupted) view.answer.insertAdjacentHTML("beforeend", ' <span class="cut">(interrupted)</span>');
      if (event.truncated) view.answer.insertAdjacentHTML("beforeend", ' <span class="cut">(cut at the length limit)</span>');
      announce(`Answer: ${event.text.trim()}`);
      // A later turn answered: errors of earlier turns, and of missing workers, are over.
      clearErrors((cause) => cause.startsWith("turn:") || cause.startsWith("worker:"));
      setState("listening");
      break;
    case "barge_in":
      setState("hearing");
      break;
    case "vision":
      $("seen").textContent = event.text ? `Text the camera sees: “${event.text}”` : "The camera sees no text.";
      break;
    case "latency":
      if (event.first_audio_sent != null && $("status").dataset.state === "thinking") setState("speaking");
      latencies.unshift({ ...event, session: sessionKey });
      latencies.splice(LATENCY_TURNS_SHOWN);
      renderLatency();
      break;
    case "error":
      onError(event, view);
      break;
    case "connection.lost":
      nextSessionWhy = "reconnected";
      setState("reconnecting");
      endSession("the connection dropped");
      showError("connection", "The connection to the gateway was lost; reconnecting…");
      break;
    case "connection.restored":
      clearError("connection");
      setState("listening");
      refreshWorkers();
      break;
  }
  if (view) scrollToLatest();
}

/** Refusals of a typed question: it was not asked, so the page goes back to listening and keeps the text. */
const REFUSED_QUESTION = new Set(["still_listening", "malformed_message", "question_too_long", "message_too_large", "rate_limited"]);

function onError(event, view) {
  if (event.code === "answer_truncated") return; // the answer itself says "(cut at the length limit)"
  if (REFUSED_QUESTION.has(event.code) && pendingQuestion !== null) {
    if (!$("question").value) $("question").value = pendingQuestion;
    pendingQuestion = null;
    if ($("status").dataset.state === "thinking") setState("listening");
  }
  if (event.code === "no_worker") {
    const kind = /no (\w+) worker/.exec(event.message)?.[1] ?? "worker";
    showError(`worker:${kind}`, explain(event));
    refreshWorkers();
  } else {
    showError(event.turn != null ? `turn:${event.turn}` : `code:${event.code}`, explain(event));
  }
  const fatal = ["no_worker", "stt_failed", "llm_failed"].includes(event.code);
  if (view && fatal) {
    view.done = true;
    view.you.classList.remove("partial");
    if (view.answer.hidden) {
      view.answer.hidden = false;
      view.answer.innerHTML = '<span class="cut">(not answered)</span>';
    }
    setState("listening");
  }
}

// -- the latency chart: every turn shown on one scale --------------------------

const STAGES = [
  ["End of turn detected", (e) => [0, e.end_of_turn], "gateway"],
  ["Speech to text", (e) => [0, e.stt_final], "stt"],
  ["LLM first token", (e) => [e.stt_final, e.first_token], "llm"],
  ["First piece of text", (e) => [e.first_token, e.first_clause], "llm"],
  ["TTS first audio", (e) => [e.first_clause, e.first_tts_audio], "tts"],
  ["Answer audio sent", (e) => [Math.max(e.end_of_turn, e.first_tts_audio ?? 0), e.first_audio_sent], "gateway"],
];

function renderLatency() {
  const scale = Math.max(1, ...latencies.flatMap((e) => STAGES.map(([, span]) => span(e)[1] ?? 0)));
  const tables = latencies.map((event) => latencyTable(event, scale));
  $("latency").replaceChildren(...tables);
}

function latencyTable(event, scale) {
  const workers = event.workers ?? {};
  const table = document.createElement("table");
  table.className = "latency-turn";
  table.dataset.turn = String(event.turn);
  table.dataset.session = event.session;
  const caption = table.createCaption();
  caption.textContent = event.first_audio_sent != null
    ? `Turn ${event.turn}: the answer began ${Math.round(event.first_audio_sent)} ms after you stopped`
    : `Turn ${event.turn}: no answer audio`;
  for (const [name, span, who] of STAGES) {
    const [start, end] = span(event);
    if (end == null) continue;
    const from = Math.max(0, Math.min(start ?? 0, end));
    const row = table.insertRow();
    row.dataset.stage = name;
    const head = document.createElement("th");
    head.scope = "row";
    head.textContent = name;
    const track = row.insertCell();
    track.className = "track-cell";
    track.innerHTML = '<div class="track" aria-hidden="true"><div class="bar"></div></div>';
    const bar = track.querySelector(".bar");
    bar.style.left = `${(100 * from) / scale}%`;
    bar.style.width = `${(100 * (end - from)) / scale}%`;
    const ms = row.insertCell();
    ms.className = "ms";
    ms.textContent = `${Math.round(end - from)} ms`;
    ms.title = `from ${Math.round(from)} to ${Math.round(end)} ms after you stopped`;
    const served = row.insertCell();
    served.className = "who";
    served.textContent = who === "gateway" ? "gateway" : (workers[who] ?? (who === "stt" ? "typed" : ""));
    const inline = document.createElement("small"); // the worker under the stage, on a narrow screen
    inline.textContent = served.textContent;
    head.append(inline);
    row.prepend(head);
  }
  if (workers.vision) {
    const row = table.insertRow();
    row.dataset.stage = "Camera read";
    row.innerHTML = '<th scope="row">Camera read</th><td class="note" colspan="2">at the start of the turn</td><td class="who"></td>';
    row.querySelector(".who").textContent = workers.vision;
  }
  return table;
}

// -- meters ---------------------------------------------------------------------

/** Drive `meterElement` from `stream`'s level; keeps the loudest level seen in data-peak. */
function meter(stream, meterElement) {
  const context = new AudioContext();
  const analyser = context.createAnalyser();
  analyser.fftSize = 1024;
  context.createMediaStreamSource(stream).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  meterElement.dataset.peak = "0";
  const timer = setInterval(() => {
    analyser.getFloatTimeDomainData(samples);
    const rms = Math.sqrt(samples.reduce((sum, s) => sum + s * s, 0) / samples.length);
    meterElement.value = Math.min(1, rms * 4);
    meterElement.dataset.peak = String(Math.max(Number(meterElement.dataset.peak), rms));
  }, 100);
  return () => {
    clearInterval(timer);
    context.close();
    meterElement.value = 0;
  };
}

// -- devices --------------------------------------------------------------------

async function listDevices() {
  if (!navigator.mediaDevices?.enumerateDevices) return;
  const devices = await navigator.mediaDevices.enumerateDevices();
  fill($("mic-select"), devices.filter((d) => d.kind === "audioinput"), "Microphone");
  fill($("camera-select"), devices.filter((d) => d.kind === "videoinput"), "Camera");
  const canPick = "setSinkId" in HTMLMediaElement.prototype;
  $("speaker-field").hidden = !canPick;
  if (canPick) fill($("speaker-select"), devices.filter((d) => d.kind === "audiooutput"), "Speaker");
}

function fill(select, devices, noun) {
  const chosen = select.value;
  const options = [new Option("Default", "")];
  devices.forEach((d, i) => d.deviceId && d.deviceId !== "default" && options.push(new Option(d.label || `${noun} ${i + 1}`, d.deviceId)));
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

function audioConstraints() {
  const processing = $("processing").checked;
  const id = $("mic-select").value;
  return { echoCancellation: processing, noiseSuppression: processing, autoGainControl: processing, ...(id ? { deviceId: { exact: id } } : {}) };
}

function videoConstraints() {
  const id = $("camera-select").value;
  return { width: { ideal: 640 }, height: { ideal: 480 }, ...(id ? { deviceId: { exact: id } } : { facingMode: "environment" }) };
}

/** The microphone now sent: muted, or (push to talk) only while the talk button is held. */
function applyMicrophoneGate() {
  const track = media?.getAudioTracks()[0];
  if (!track) return;
  const muted = $("mute").getAttribute("aria-pressed") === "true";
  const ptt = $("ptt").checked;
  track.enabled = !muted && (!ptt || $("talk").dataset.held === "true");
}

async function switchMicrophone() {
  if (!session || !media) return;
  let fresh;
  try {
    fresh = await navigator.mediaDevices.getUserMedia({ audio: audioConstraints() });
  } catch (err) {
    showError("media", explainMediaError(err, "microphone"));
    return;
  }
  const track = fresh.getAudioTracks()[0];
  const old = media.getAudioTracks()[0];
  await session.sendAudio(track);
  if (old) {
    media.removeTrack(old);
    old.stop();
  }
  media.addTrack(track);
  applyMicrophoneGate();
  stopMicMeter();
  stopMicMeter = meter(new MediaStream([track]), $("mic-level"));
  clearError("media");
}

async function setCamera(on) {
  if (!session) return;
  if (on) {
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ video: videoConstraints() });
      camera?.stop();
      camera = stream.getVideoTracks()[0];
    } catch (err) {
      showError("media", explainMediaError(err, "camera"));
      $("camera").checked = false;
      return;
    }
    clearError("media");
    await session.sendFrames(camera);
  } else {
    await session.sendFrames(null);
    camera?.stop();
    camera = null;
  }
  showPreview();
}

function showPreview() {
  $("camera-card").hidden = !camera;
  $("preview").srcObject = camera ? new MediaStream([camera]) : null;
  if (!camera) $("seen").textContent = "";
}

// -- start and stop -----------------------------------------------------------

async function start() {
  clearErrors(() => true);
  nextSessionWhy = "new";
  $("start").disabled = true;
  setState("connecting");
  const wantCamera = $("camera").checked;
  try {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new Error("This browser gives pages the microphone only over HTTPS or on localhost (see the README: from a laptop).");
    }
    try {
      media = await navigator.mediaDevices.getUserMedia({ audio: audioConstraints(), video: wantCamera ? videoConstraints() : false });
    } catch (err) {
      throw new Error(explainMediaError(err, wantCamera ? "microphone and camera" : "microphone"));
    }
    camera = media.getVideoTracks()[0] ?? null;
    if (camera) media.removeTrack(camera);
    showPreview();
    listDevices();
    applyMicrophoneGate();
    try {
      session = await GatewaySession.connect(gatewayUrl, {
        audio: media.getAudioTracks()[0],
        video: camera,
        token: $("token").value.trim(),
        reconnect: true,
      });
    } catch (err) {
      throw new Error(err instanceof GatewayError ? explain(err) : String(err));
    }
  } catch (err) {
    showError("session", err.message);
    setState("error");
    teardown();
    return;
  }
  const current = session;
  current.events.forEach(render); // any that came while connecting
  current.on("*", render);
  current.closed.then((reason) => {
    if (session !== current) return;
    if (reason) {
      showError("session", explain(reason));
      setState("error", "Disconnected");
    }
    teardown();
    refreshWorkers();
  });
  $("speaker").srcObject = current.answerStream;
  stopAnswerMeter = meter(current.answerStream, $("level"));
  stopMicMeter = meter(new MediaStream(media.getAudioTracks()), $("mic-level"));
  for (const id of ["stop", "mute", "talk"]) $(id).disabled = false;
  setState("listening");
  ($("ptt").checked ? $("talk") : $("stop")).focus();
  refreshWorkers();
}

function stop() {
  session?.close();
  endSession("stopped");
  teardown();
  setState("idle");
}

function teardown() {
  const hadFocus = document.activeElement === $("stop");
  session = null;
  media?.getTracks().forEach((track) => track.stop());
  media = null;
  camera?.stop();
  camera = null;
  showPreview();
  stopMicMeter();
  stopAnswerMeter();
  stopMicMeter = stopAnswerMeter = () => {};
  for (const id of ["stop", "mute", "talk", "interrupt"]) $(id).disabled = true;
  $("question").disabled = $("send").disabled = true;
  $("start").disabled = false;
  if (hadFocus) $("start").focus();
}

// -- controls -------------------------------------------------------------------

function ask(event) {
  event.preventDefault();
  const text = $("question").value.trim();
  if (!text || !session) return;
  try {
    session.ask(text);
  } catch (err) {
    showError("session", explain(err));
    return;
  }
  pendingQuestion = text;
  $("question").value = "";
  setState("thinking");
}

function holdToTalk(held) {
  $("talk").dataset.held = String(held);
  $("talk").textContent = held ? "Talking… (release to send)" : "Hold to talk";
  applyMicrophoneGate();
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
$("ask-form").addEventListener("submit", ask);
$("interrupt").addEventListener("click", () => {
  try {
    session?.interrupt();
  } catch (err) {
    showError("session", explain(err)); // not connected now (reconnecting)
  }
});
$("mute").addEventListener("click", () => {
  const muted = $("mute").getAttribute("aria-pressed") !== "true";
  $("mute").setAttribute("aria-pressed", String(muted));
  $("mute").textContent = muted ? "Unmute" : "Mute";
  applyMicrophoneGate();
});
$("ptt").addEventListener("change", () => {
  $("talk").hidden = !$("ptt").checked;
  holdToTalk(false);
});
$("talk").addEventListener("pointerdown", () => holdToTalk(true));
for (const type of ["pointerup", "pointerleave", "pointercancel"]) $("talk").addEventListener(type, () => holdToTalk(false));
$("talk").addEventListener("keydown", (e) => (e.key === " " || e.key === "Enter") && !e.repeat && (e.preventDefault(), holdToTalk(true)));
$("talk").addEventListener("keyup", (e) => (e.key === " " || e.key === "Enter") && holdToTalk(false));
$("camera").addEventListener("change", () => setCamera($("camera").checked));
$("camera-select").addEventListener("change", () => camera && setCamera(true));
$("mic-select").addEventListener("change", switchMicrophone);
$("processing").addEventListener("change", switchMicrophone);
$("speaker-select").addEventListener("change", () => $("speaker").setSinkId?.($("speaker-select").value));
navigator.mediaDevices?.addEventListener?.("devicechange", listDevices);
document.addEventListener("visibilitychange", () => document.visibilityState === "visible" && refreshWorkers());

$("token-form").addEventListener("submit", (e) => e.preventDefault());
$("settings").open = matchMedia("(min-width: 52rem)").matches; // folded on a phone: the conversation comes first
setState("idle");
listDevices();
refreshWorkers();

// For tests and debugging from the console.
Object.defineProperty(demo, "session", { get: () => session });
Object.defineProperty(demo, "health", { get: () => lastHealth });
Object.defineProperty(demo, "microphone", { get: () => media?.getAudioTracks()[0] ?? null });
window.edgestreamDemo = demo;
