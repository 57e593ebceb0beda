/**
 * The edgestream JavaScript SDK: one WebRTC session with a gateway, for web
 * pages and WebXR/AR apps. It is the browser twin of the Python SDK
 * (`stream/sdk.py`): connect, receive events, send audio and camera frames,
 * say() a recorded clip, close.
 *
 *     import { GatewaySession } from "/edgestream.js";
 *
 *     const mic = await navigator.mediaDevices.getUserMedia({ audio: true });
 *     const session = await GatewaySession.connect(GatewaySession.defaultUrl(), {
 *       audio: mic.getAudioTracks()[0],
 *     });
 *     session.on("transcript.final", (e) => console.log("you said", e.text));
 *     session.on("answer.token", (e) => console.log("answer +", e.text));
 *     new Audio().srcObject = session.answerStream;   // the spoken answer
 *     const done = await session.waitEvent("answer.done");
 *     session.close();
 *
 * Events are the gateway's data-channel events (README, "Signaling and
 * events"): `session.ready`, `transcript.partial`, `transcript.final`,
 * `vision`, `answer.token`, `answer.done`, `barge_in`, `latency`, `waiting`
 * (every worker of a kind is full; the turn waits for one), `error`.
 * The session itself adds `close` (detail: a GatewayError, or null when you
 * closed it), and with `reconnect`, `connection.lost` and
 * `connection.restored` (they are also kept in `events`). Listen with
 * `on(type, fn)` (fn gets the event object; "*" for every event) or with
 * `addEventListener(type, e => e.detail)`. The other way, `ask(text)` sends
 * a typed question and `interrupt()` stops the answer.
 *
 * With `reconnect: true` (or backoff options), a session outlives a gateway
 * restart: it retries with exponential backoff and jitter, then carries on
 * with the same microphone, camera and answer stream. Refusals that a retry
 * cannot fix (`unauthorized`, `token_revoked`, `bad_offer`) end it.
 *
 * No build step and no dependencies: this file is an ES module served as is.
 */

/** Why a session could not start or ended: `code` is machine-readable. */
export class GatewayError extends Error {
  /** @param {string} code @param {string} message */
  constructor(code, message) {
    super(message);
    this.name = "GatewayError";
    this.code = code;
  }
}

const ICE_GATHERING_TIMEOUT_MS = 2000;
/** Refusals another attempt cannot fix: a reconnecting session ends on them. */
const FINAL_CODES = new Set(["unauthorized", "token_revoked", "bad_offer", "malformed"]);
const DEFAULT_BACKOFF = { initialMs: 500, maxMs: 10000, factor: 2, jitter: 0.2, maxAttempts: Infinity };

export class GatewaySession extends EventTarget {
  /** @private */
  constructor(url, { token = "", reconnect = false, timeoutMs = 20000 } = {}) {
    super();
    this.url = url;
    this._token = token;
    this._timeoutMs = timeoutMs;
    /** Backoff options when reconnecting, else null. */
    this.backoff = reconnect ? { ...DEFAULT_BACKOFF, ...(reconnect === true ? {} : reconnect) } : null;
    /** @type {RTCPeerConnection | null} the current connection's */
    this.pc = null;
    /** @type {string} */
    this.sessionId = "";
    /** Every event received, in order. @type {object[]} */
    this.events = [];
    /** The answer audio from the gateway; play it with an <audio> element. */
    this.answerStream = new MediaStream();
    /** @type {GatewayError | null} */
    this.closeReason = null;
    /** Resolves (with closeReason) once the session has ended for good, for any reason. */
    this.closed = new Promise((resolve) => (this._resolveClosed = resolve));
    this.isClosed = false;
    /** Whether a connection is up now (false while reconnecting). */
    this.isConnected = false;
    /** Connections restored after a loss. */
    this.reconnects = 0;
    /** @type {WebSocket | null} */
    this._signaling = null;
    /** @type {MediaStreamTrack | null} the track sent when say() is not speaking */
    this._audioTrack = null;
    /** @type {MediaStreamTrack | null} */
    this._videoTrack = null;
    this._speech = null;
  }

  /** The gateway's signaling URL for a page served by the gateway itself. */
  static defaultUrl() {
    return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/session`;
  }

  /**
   * Open a session and wait until media flows.
   *
   * @param {string} url signaling URL, e.g. "wss://gateway.local:8080/session"
   * @param {object} [options]
   * @param {MediaStreamTrack | null} [options.audio] microphone track; without
   *   one the session sends silence until say() or sendAudio()
   * @param {MediaStreamTrack | null} [options.video] camera track; a video
   *   sender is always negotiated, so frames can start later with sendFrames()
   * @param {string} [options.token] the client token the gateway asks for
   *   (`edgestream token create NAME`)
   * @param {boolean | object} [options.reconnect] keep the session across
   *   gateway restarts; an object sets the backoff: `{initialMs, maxMs,
   *   factor, jitter, maxAttempts}` (defaults 500, 10000, 2, 0.2, Infinity)
   * @param {number} [options.timeoutMs] for signaling and ICE together, per attempt
   * @returns {Promise<GatewaySession>}
   * @throws {GatewayError} `unreachable`, `timeout`, or the gateway's refusal
   *   code (`unauthorized`, `too_many_sessions`, `bad_offer`, ...); the first
   *   connection is not retried
   */
  static async connect(url, { audio = null, video = null, token = "", reconnect = false, timeoutMs = 20000 } = {}) {
    const session = new GatewaySession(url, { token, reconnect, timeoutMs });
    session._audioTrack = audio;
    session._videoTrack = video;
    try {
      await session._connectOnce();
    } catch (err) {
      session._end(null);
      throw err instanceof GatewayError ? err : new GatewayError("failed", String(err?.message ?? err));
    }
    return session;
  }

  /** One connection: a new peer connection, offer, answer, ICE. @private */
  async _connectOnce() {
    const pc = new RTCPeerConnection();
    this.pc = pc;
    for (const track of this.answerStream.getTracks()) this.answerStream.removeTrack(track);
    await withTimeout(this._open(pc), this._timeoutMs, "timeout", "the gateway did not answer in time");
    this.isConnected = true;
  }

  /** @private */
  async _open(pc) {
    const speaking = this._speech?.pending > 0 ? this._speech.destination.stream.getAudioTracks()[0] : null;
    this._audioSender = pc.addTransceiver(speaking ?? this._audioTrack ?? "audio", { direction: "sendrecv" }).sender;
    this._videoSender = pc.addTransceiver(this._videoTrack ?? "video", { direction: "sendonly" }).sender;
    pc.ontrack = (e) => this.answerStream.addTrack(e.track);
    const channel = pc.createDataChannel("events");
    this._channel = channel;
    channel.onmessage = (e) => this._onEvent(e.data);
    const channelOpen = new Promise((resolve) => (channel.onopen = resolve));
    const connected = new Promise((resolve, reject) => {
      pc.onconnectionstatechange = () => {
        if (pc.connectionState === "connected") resolve();
        else if (pc.connectionState === "failed") {
          const err = new GatewayError("connection_failed", "the WebRTC connection failed");
          reject(err);
          this._lost(pc, err);
        }
      };
    });
    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc); // aiortc takes no trickled candidates

    const signaling = await openSocket(this.url);
    if (this.pc !== pc) {
      signaling.close();
      throw new GatewayError("closed", "the session ended");
    }
    this._signaling = signaling;
    const offer = { type: "offer", sdp: pc.localDescription.sdp };
    if (this._token) offer.token = this._token;
    signaling.send(JSON.stringify(offer));
    const reply = await nextMessage(signaling);
    if (reply.type === "error") throw new GatewayError(reply.code ?? "error", reply.message ?? "refused");
    if (reply.type !== "answer") throw new GatewayError("protocol", `unexpected reply ${reply.type}`);
    this.sessionId = reply.session_id;
    let lastError = null;
    signaling.onmessage = (e) => {
      const message = parseJson(e.data);
      if (message?.type === "error") lastError = new GatewayError(message.code, message.message);
    };
    signaling.onclose = () =>
      this._lost(pc, lastError ?? new GatewayError("gateway_lost", "the connection to the gateway was lost"));
    await pc.setRemoteDescription({ type: "answer", sdp: reply.sdp });
    // Open once media flows and the events channel is open: ask() works as soon as connect() returns.
    await Promise.race([Promise.all([connected, channelOpen]), this.closed.then((reason) => Promise.reject(reason))]);
  }

  /** The connection of `pc` is gone: end the session, or reconnect. @private */
  _lost(pc, reason) {
    if (this.isClosed || pc !== this.pc || !this.isConnected) return;
    this.isConnected = false;
    if (!this.backoff || FINAL_CODES.has(reason.code)) {
      this._end(reason);
      return;
    }
    this._dropConnection();
    this._onEvent(JSON.stringify({ type: "connection.lost", code: reason.code, message: reason.message }));
    this._retry(1, reason);
  }

  /** @private */
  _retry(attempt, reason) {
    const { initialMs, maxMs, factor, jitter, maxAttempts } = this.backoff;
    if (attempt > maxAttempts) {
      this._end(reason);
      return;
    }
    const base = Math.min(maxMs, initialMs * factor ** (attempt - 1));
    const delay = base * (1 - jitter + 2 * jitter * Math.random());
    this._retryTimer = setTimeout(async () => {
      if (this.isClosed) return;
      try {
        await this._connectOnce();
      } catch (err) {
        const error = err instanceof GatewayError ? err : new GatewayError("failed", String(err?.message ?? err));
        this._dropConnection();
        if (FINAL_CODES.has(error.code)) this._end(error);
        else if (!this.isClosed) this._retry(attempt + 1, error);
        return;
      }
      this.reconnects += 1;
      this._onEvent(JSON.stringify({ type: "connection.restored", session_id: this.sessionId, attempts: attempt }));
    }, delay);
  }

  /** Close the current connection's socket and peer connection (the session lives on). @private */
  _dropConnection() {
    if (this._signaling) {
      this._signaling.onclose = null;
      this._signaling.close();
      this._signaling = null;
    }
    this.pc?.close();
  }

  /** @private */
  _onEvent(data) {
    const event = parseJson(data);
    if (event === null || typeof event.type !== "string") return;
    this.events.push(event);
    this.dispatchEvent(new CustomEvent(event.type, { detail: event }));
    this.dispatchEvent(new CustomEvent("*", { detail: event }));
  }

  /**
   * Call `handler(event)` for every event of `type` ("*" for all).
   * @returns {() => void} a function that stops it
   */
  on(type, handler) {
    const listener = (e) => handler(e.detail);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  /**
   * The first event of `type` (at index >= `after` in `events`) whose fields
   * equal those in `match`; waits for it up to `timeoutMs`.
   * @returns {Promise<object>}
   */
  waitEvent(type, { timeoutMs = 30000, after = 0, match = {} } = {}) {
    const fits = (e) => e.type === type && Object.entries(match).every(([k, v]) => e[k] === v);
    const seen = this.events.slice(after).find(fits);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const finish = (fn, value) => {
        clearTimeout(timer);
        off();
        fn(value);
      };
      const off = this.on("*", (e) => fits(e) && finish(resolve, e));
      const timer = setTimeout(() => finish(reject, new GatewayError("timeout", `no ${type} event within ${timeoutMs} ms`)), timeoutMs);
      this.closed.then((reason) => finish(reject, reason ?? new GatewayError("closed", "the session ended")));
    });
  }

  /**
   * Ask a typed question: it is answered in text and speech, as a turn of its
   * own (its `transcript.final` carries the text). The gateway refuses it with
   * an `error` (`still_listening`) while a spoken question is being heard.
   * @throws {GatewayError} `not_connected` while there is no connection
   */
  ask(text) {
    this._sendMessage({ type: "ask", text });
  }

  /** Stop the answer now, as speaking over it would. Nothing playing: nothing happens. */
  interrupt() {
    this._sendMessage({ type: "interrupt" });
  }

  /** @private */
  _sendMessage(message) {
    if (!this.isConnected || this._channel?.readyState !== "open")
      throw new GatewayError("not_connected", "the session is not connected now");
    this._channel.send(JSON.stringify(message));
  }

  /** Send this microphone track from now on (null: silence). No renegotiation. */
  async sendAudio(track) {
    this._audioTrack = track;
    if (!this._speech) await this._audioSender.replaceTrack(track);
  }

  /** Send this camera track's frames from now on (null: stop sending frames). */
  async sendFrames(track) {
    this._videoTrack = track;
    await this._videoSender.replaceTrack(track);
  }

  /**
   * Speak recorded PCM into the session (mono, Float32 in [-1, 1] or Int16),
   * in place of the microphone until it has played.
   * @returns {Promise<number>} performance.now() when its last sample was sent
   */
  async say(samples, sampleRate) {
    const floats = samples instanceof Float32Array ? samples : Float32Array.from(samples, (s) => s / 32768);
    if (!this._speech) {
      const context = new AudioContext();
      this._speech = { context, destination: context.createMediaStreamDestination(), pending: 0 };
    }
    const { context, destination } = this._speech;
    await context.resume();
    const buffer = context.createBuffer(1, floats.length, sampleRate);
    buffer.copyToChannel(floats, 0);
    const source = context.createBufferSource();
    source.buffer = buffer;
    source.connect(destination);
    this._speech.pending += 1;
    await this._audioSender.replaceTrack(destination.stream.getAudioTracks()[0]);
    const ended = new Promise((resolve) => (source.onended = () => resolve(performance.now())));
    source.start();
    const at = await ended;
    if (--this._speech.pending === 0) await this._audioSender.replaceTrack(this._audioTrack);
    return at;
  }

  /**
   * Figures from the peer connection: answer audio received (packets, level)
   * and media sent.
   */
  async stats() {
    const out = { audioPacketsReceived: 0, audioLevel: 0, audioPacketsSent: 0, videoFramesSent: 0 };
    (await this.pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "audio") {
        out.audioPacketsReceived = s.packetsReceived ?? 0;
        out.audioLevel = s.audioLevel ?? 0;
      } else if (s.type === "outbound-rtp" && s.kind === "audio") out.audioPacketsSent = s.packetsSent ?? 0;
      else if (s.type === "outbound-rtp" && s.kind === "video") out.videoFramesSent = s.framesSent ?? 0;
    });
    return out;
  }

  /** End the session (the gateway cancels its jobs). Safe to call twice. */
  close() {
    this._end(null);
  }

  /** @private */
  _end(reason) {
    if (this.isClosed) return;
    this.isClosed = true;
    this.isConnected = false;
    this.closeReason = reason;
    clearTimeout(this._retryTimer);
    this._dropConnection();
    this._speech?.context.close();
    this._resolveClosed(reason);
    this.dispatchEvent(new CustomEvent("close", { detail: reason }));
  }
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

function withTimeout(promise, ms, code, message) {
  let timer;
  const timeout = new Promise((_, reject) => (timer = setTimeout(() => reject(new GatewayError(code, message)), ms)));
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function iceGatheringComplete(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== "complete") return;
      pc.removeEventListener("icegatheringstatechange", done);
      resolve();
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, ICE_GATHERING_TIMEOUT_MS); // send what was gathered so far
  });
}

function openSocket(url) {
  return new Promise((resolve, reject) => {
    let socket;
    try {
      socket = new WebSocket(url);
    } catch (err) {
      reject(new GatewayError("bad_url", `not a WebSocket URL: ${url}`));
      return;
    }
    socket.onopen = () => resolve(socket);
    socket.onerror = () => reject(new GatewayError("unreachable", `cannot reach the gateway at ${url}`));
  });
}

function nextMessage(socket) {
  return new Promise((resolve, reject) => {
    socket.onmessage = (e) => {
      const message = parseJson(e.data);
      if (message === null) reject(new GatewayError("protocol", "the gateway sent something that is not JSON"));
      else resolve(message);
    };
    socket.onclose = () => reject(new GatewayError("gateway_lost", "the gateway closed the connection"));
  });
}
