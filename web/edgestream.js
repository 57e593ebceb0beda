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
 * `vision`, `answer.token`, `answer.done`, `barge_in`, `latency`, `error`.
 * The session itself adds `close` (detail: a GatewayError, or null when you
 * closed it). Listen with `on(type, fn)` (fn gets the event object; "*" for
 * every event) or with `addEventListener(type, e => e.detail)`.
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

export class GatewaySession extends EventTarget {
  /** @param {RTCPeerConnection} pc @private */
  constructor(pc) {
    super();
    this.pc = pc;
    /** @type {string} */
    this.sessionId = "";
    /** Every event received, in order. @type {object[]} */
    this.events = [];
    /** The answer audio from the gateway; play it with an <audio> element. */
    this.answerStream = new MediaStream();
    /** @type {GatewayError | null} */
    this.closeReason = null;
    /** Resolves (with closeReason) once the session has ended, for any reason. */
    this.closed = new Promise((resolve) => (this._resolveClosed = resolve));
    this.isClosed = false;
    /** @type {WebSocket | null} */
    this._signaling = null;
    /** @type {MediaStreamTrack | null} the track sent when say() is not speaking */
    this._audioTrack = null;
    this._speech = null;
  }

  /** The gateway's signaling URL for a page served by the gateway itself. */
  static defaultUrl() {
    return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/session`;
  }

  /**
   * Open a session and wait until media flows.
   *
   * @param {string} url signaling URL, e.g. "ws://gateway.local:8080/session"
   * @param {object} [options]
   * @param {MediaStreamTrack | null} [options.audio] microphone track; without
   *   one the session sends silence until say() or sendAudio()
   * @param {MediaStreamTrack | null} [options.video] camera track; a video
   *   sender is always negotiated, so frames can start later with sendFrames()
   * @param {number} [options.timeoutMs] for signaling and ICE together
   * @returns {Promise<GatewaySession>}
   * @throws {GatewayError} `unreachable`, `timeout`, or the gateway's refusal
   *   code (`too_many_sessions`, `bad_offer`, ...)
   */
  static async connect(url, { audio = null, video = null, timeoutMs = 20000 } = {}) {
    const pc = new RTCPeerConnection();
    const session = new GatewaySession(pc);
    try {
      await withTimeout(session._open(url, audio, video), timeoutMs, "timeout", "the gateway did not answer in time");
    } catch (err) {
      session._end(null);
      throw err instanceof GatewayError ? err : new GatewayError("failed", String(err?.message ?? err));
    }
    return session;
  }

  /** @private */
  async _open(url, audio, video) {
    const pc = this.pc;
    this._audioTrack = audio;
    this._audioSender = pc.addTransceiver(audio ?? "audio", { direction: "sendrecv" }).sender;
    this._videoSender = pc.addTransceiver(video ?? "video", { direction: "sendonly" }).sender;
    pc.ontrack = (e) => this.answerStream.addTrack(e.track);
    const channel = pc.createDataChannel("events");
    channel.onmessage = (e) => this._onEvent(e.data);
    const connected = new Promise((resolve, reject) => {
      pc.onconnectionstatechange = () => {
        if (pc.connectionState === "connected") resolve();
        else if (pc.connectionState === "failed") {
          const err = new GatewayError("connection_failed", "the WebRTC connection failed");
          reject(err);
          this._end(err);
        }
      };
    });
    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc); // aiortc takes no trickled candidates

    const signaling = await openSocket(url);
    this._signaling = signaling;
    signaling.send(JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp }));
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
      this._end(lastError ?? new GatewayError("gateway_lost", "the connection to the gateway was lost"));
    await pc.setRemoteDescription({ type: "answer", sdp: reply.sdp });
    await Promise.race([connected, this.closed.then((reason) => Promise.reject(reason))]);
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

  /** Send this microphone track from now on (null: silence). No renegotiation. */
  async sendAudio(track) {
    this._audioTrack = track;
    if (!this._speech) await this._audioSender.replaceTrack(track);
  }

  /** Send this camera track's frames from now on (null: stop sending frames). */
  async sendFrames(track) {
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
    this.closeReason = reason;
    if (this._signaling) {
      this._signaling.onclose = null;
      this._signaling.close();
    }
    this.pc.close();
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
