// The demo page: a thin view over the SDK (edgestream.js). Everything it knows
// comes from the session's events and the gateway's /healthz.
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
const LATENCY_TURNS_SHOWN = 5;

/** @type {GatewaySession | null} */
let session = null;
/** @type {MediaStream | null} */
let media = null;
let stopMeter = () => {};
const turns = new Map();

// -- status and errors --------------------------------------------------------

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

/** A sentence a person can act on, for a GatewayError or an `error` event. */
function explain({ code, message }) {
  switch (code) {
    case "no_worker": {
      const kind = /no (\w+) worker/.exec(message)?.[1] ?? "";
      const name = KIND_NAMES[kind] ?? kind;
      return `No ${name} worker is available, so this turn cannot be answered. ` +
        `An operator can start one with: edgestream worker ${kind}`;
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
    case "utterance_too_long":
    case "answer_truncated":
    case "rate_limited":
      return message.charAt(0).toUpperCase() + message.slice(1) + ".";
    case "ice_timeout":
    case "connection_failed":
      return "Audio could not connect to the gateway (WebRTC). A firewall may block UDP between you and it.";
    case "timeout":
      return `The gateway at ${gatewayUrl} did not answer in time.`;
    default:
      return `${message} (${code})`;
  }
}

function explainMediaError(err, wantCamera) {
  const what = wantCamera ? "microphone and camera" : "microphone";
  if (err.name === "NotAllowedError" || err.name === "SecurityError")
    return `Permission to use the ${what} was denied. Allow it for this page (the icon in the address bar) and press Start talking again.`;
  if (err.name === "NotFoundError" || err.name === "OverconstrainedError")
    return `No ${what} was found on this device.`;
  if (err.name === "NotReadableError")
    return `The ${what} is in use by another application.`;
  return `Cannot open the ${what}: ${err.message}`;
}

// -- workers at the gateway ---------------------------------------------------

async function refreshWorkers() {
  const list = $("workers");
  let workers;
  try {
    const reply = await fetch(healthUrl, { cache: "no-store" });
    workers = (await reply.json()).workers;
  } catch {
    list.replaceChildren(chip("gateway not reachable", false));
    return;
  }
  list.replaceChildren(...Object.entries(workers).map(([kind, up]) => chip(`${KIND_NAMES[kind] ?? kind} ${up ? "ready" : "missing"}`, up)));
}

function chip(text, up) {
  const item = document.createElement("li");
  item.textContent = text;
  item.dataset.up = String(up);
  return item;
}

// -- the conversation ---------------------------------------------------------

function turnView(number) {
  if (!turns.has(number)) {
    const item = document.createElement("li");
    const you = document.createElement("p");
    you.className = "you partial";
    const answer = document.createElement("p");
    answer.className = "answer";
    answer.hidden = true;
    item.append(you, answer);
    item.dataset.turn = String(number);
    $("turns").append(item);
    turns.set(number, { item, you, answer });
  }
  return turns.get(number);
}

function render(event) {
  const view = event.turn != null ? turnView(event.turn) : null;
  switch (event.type) {
    case "transcript.partial":
      view.you.textContent = event.text;
      break;
    case "transcript.final":
      view.you.textContent = event.text || "(nothing heard)";
      view.you.classList.remove("partial");
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
      view.answer.hidden = false;
      view.answer.classList.remove("waiting");
      view.answer.textContent = event.text;
      if (event.interrupted) view.answer.insertAdjacentHTML("beforeend", ' <span class="cut">(interrupted)</span>');
      if (event.truncated) view.answer.insertAdjacentHTML("beforeend", ' <span class="cut">(cut at the length limit)</span>');
      break;
    case "vision":
      $("seen").textContent = event.text ? `Text the camera sees: “${event.text}”` : "The camera sees no text.";
      break;
    case "latency":
      renderLatency(event);
      break;
    case "error":
      showError(explain(event));
      break;
    case "connection.lost":
      setStatus("connecting", "Reconnecting…");
      showError("The connection to the gateway was lost; reconnecting…");
      break;
    case "connection.restored":
      turns.clear(); // the new session numbers its turns from 1 again
      clearError();
      setStatus("live", "Listening");
      refreshWorkers();
      break;
  }
}

/** One turn's stages as a small bar chart (a table, so screen readers read it too). */
function renderLatency(event) {
  const workers = event.workers ?? {};
  const stages = [
    ["End of turn detected", 0, event.end_of_turn, "gateway"],
    ["Speech to text", 0, event.stt_final, workers.stt],
    ["LLM first token", event.stt_final, event.first_token, workers.llm],
    ["First clause", event.first_token, event.first_clause, workers.llm],
    ["TTS first audio", event.first_clause, event.first_tts_audio, workers.tts],
    ["Answer audio sent", Math.max(event.end_of_turn, event.first_tts_audio ?? 0), event.first_audio_sent, "gateway"],
  ].filter(([, , end]) => end != null);
  const scale = Math.max(1, ...stages.map(([, , end]) => end));

  const table = document.createElement("table");
  const caption = table.createCaption();
  caption.textContent = event.first_audio_sent != null
    ? `Turn ${event.turn}: the answer began ${Math.round(event.first_audio_sent)} ms after you stopped`
    : `Turn ${event.turn}`;
  for (const [name, start, end, who] of stages) {
    const row = table.insertRow();
    row.dataset.stage = name;
    const head = document.createElement("th");
    head.scope = "row";
    head.textContent = name;
    row.append(head);
    const track = row.insertCell();
    track.innerHTML = '<div class="track" aria-hidden="true"><div class="bar"></div></div>';
    const bar = track.querySelector(".bar");
    const from = Math.max(0, Math.min(start ?? 0, end));
    bar.style.left = `${(100 * from) / scale}%`;
    bar.style.width = `${(100 * (end - from)) / scale}%`;
    const ms = row.insertCell();
    ms.className = "ms";
    ms.textContent = `${Math.round(end)} ms`;
    const served = row.insertCell();
    served.className = "who";
    served.textContent = who ?? "";
  }
  if (workers.vision) {
    const row = table.insertRow();
    row.dataset.stage = "Camera read";
    row.innerHTML = '<th scope="row">Camera read</th><td class="note" colspan="2">at the start of the turn</td><td class="who"></td>';
    row.querySelector(".who").textContent = workers.vision;
  }
  const wrapper = document.createElement("div");
  wrapper.className = "latency-turn";
  wrapper.dataset.turn = String(event.turn);
  wrapper.append(table);
  $("latency").prepend(wrapper);
  while ($("latency").children.length > LATENCY_TURNS_SHOWN) $("latency").lastElementChild.remove();
}

/** Drive the level meter from the answer audio; keeps the loudest level seen in data-peak. */
function meter(stream) {
  const context = new AudioContext();
  const analyser = context.createAnalyser();
  analyser.fftSize = 1024;
  context.createMediaStreamSource(stream).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  const level = $("level");
  level.dataset.peak = "0";
  const timer = setInterval(() => {
    analyser.getFloatTimeDomainData(samples);
    const rms = Math.sqrt(samples.reduce((sum, s) => sum + s * s, 0) / samples.length);
    level.value = Math.min(1, rms * 4);
    level.dataset.peak = String(Math.max(Number(level.dataset.peak), rms));
  }, 100);
  return () => {
    clearInterval(timer);
    context.close();
    level.value = 0;
  };
}

// -- start and stop -----------------------------------------------------------

async function start() {
  clearError();
  $("start").disabled = true;
  setStatus("connecting", "Connecting…");
  const wantCamera = $("camera").checked;
  const processing = $("processing").checked;
  try {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new Error("This browser only gives pages the microphone over HTTPS (or on localhost).");
    }
    try {
      media = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: processing, noiseSuppression: processing, autoGainControl: processing },
        video: wantCamera ? { facingMode: "environment", width: { ideal: 640 }, height: { ideal: 480 } } : false,
      });
    } catch (err) {
      throw new Error(explainMediaError(err, wantCamera));
    }
    const video = media.getVideoTracks()[0] ?? null;
    $("camera-card").hidden = !video;
    $("preview").srcObject = video ? new MediaStream([video]) : null;
    try {
      session = await GatewaySession.connect(gatewayUrl, {
        audio: media.getAudioTracks()[0],
        video,
        token: $("token").value.trim(),
        reconnect: true,
      });
    } catch (err) {
      throw new Error(err instanceof GatewayError ? explain(err) : String(err));
    }
  } catch (err) {
    showError(err.message);
    setStatus("error", "Not connected");
    teardown();
    return;
  }
  const current = session;
  current.events.forEach(render); // any that came while connecting
  current.on("*", render);
  current.closed.then((reason) => {
    if (session !== current) return;
    if (reason) {
      showError(explain(reason));
      setStatus("error", "Disconnected");
    }
    teardown();
    refreshWorkers();
  });
  $("speaker").srcObject = current.answerStream;
  stopMeter = meter(current.answerStream);
  setStatus("live", "Listening");
  $("stop").disabled = false;
  $("stop").focus();
  refreshWorkers();
}

function stop() {
  session?.close();
  setStatus("idle", "Idle");
  teardown();
}

function teardown() {
  const hadFocus = document.activeElement === $("stop");
  session = null;
  media?.getTracks().forEach((track) => track.stop());
  media = null;
  stopMeter();
  stopMeter = () => {};
  $("stop").disabled = true;
  $("start").disabled = false;
  if (hadFocus) $("start").focus();
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
refreshWorkers();
setInterval(() => document.visibilityState === "visible" && refreshWorkers(), 5000);

// For tests and debugging from the console.
window.edgestreamDemo = { get session() { return session; }, gatewayUrl };
